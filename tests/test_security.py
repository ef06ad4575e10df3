"""Safe serving defaults: loopback unless credentials are given."""
from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from app.security import (
    ServeAddress, ServeError, UnsafeServe, check_port, check_serving, is_loopback, parse_credentials, parse_host,
)
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("example.org", False), ("", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "host, bind, url_host, loopback",
    [("127.0.0.1", "127.0.0.1", "127.0.0.1", True), ("localhost", "localhost", "localhost", True),
     ("::1", "::1", "[::1]", True), ("[::1]", "::1", "[::1]", True), (" ::1 ", "::1", "[::1]", True),
     ("0.0.0.0", "0.0.0.0", "0.0.0.0", False), ("::", "::", "[::]", False), ("[::]", "::", "[::]", False),
     ("fe80::1", "fe80::1", "[fe80::1]", False), ("example.org", "example.org", "example.org", False)],
)
def test_hosts_parse_with_ipv6_bracketed_in_urls(host, bind, url_host, loopback):
    address = parse_host(host)
    assert address == ServeAddress(bind, url_host)
    assert is_loopback(address.bind) is loopback


@pytest.mark.parametrize(
    "host, message",
    [("", "empty"), ("[]", "empty"), ("127.0.0.1:7860", "--port"), ("[127.0.0.1]", "not an address"),
     ("[::1", "not an address"), ("[example.org]", "not an address"), ("http://example.org", "not an address")],
)
def test_hosts_that_are_not_addresses_are_refused(host, message):
    with pytest.raises(ServeError, match=message):
        parse_host(host)


def test_a_busy_port_is_named_before_the_ui_is_built(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port}.*--port"):
            check_port(parse_host("127.0.0.1"), port)
        out = subprocess.run(
            [sys.executable, str(ROOT / "launch.py"), "--workspace", str(tmp_path), "--port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1 port {port}" in out.stderr and "Traceback" not in out.stderr


def test_an_address_this_machine_lacks_is_refused_plainly():
    with pytest.raises(ServeError, match="no such address"):
        check_port(parse_host("192.0.2.1"), free_port())  # TEST-NET-1: never a local address


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_the_app_serves_on_ipv6_loopback(tmp_path):
    from tests.browser import served_app

    with served_app(tmp_path / "workspace", args=("--host", "::1"), url_host="[::1]") as url:
        page = urllib.request.urlopen(url, timeout=30)
        assert page.status == 200 and b"gradio_config" in page.read()


@pytest.mark.parametrize(
    "host, share, credentials, refused",
    [
        ("127.0.0.1", False, [], False),
        ("0.0.0.0", False, [], True),
        ("10.0.0.2", False, [], True),
        ("127.0.0.1", True, [], True),
        ("0.0.0.0", False, [("ann", "long-password")], False),
        ("127.0.0.1", True, [("ann", "long-password")], False),
    ],
)
def test_check_serving(host, share, credentials, refused):
    if refused:
        with pytest.raises(UnsafeServe, match="--auth"):
            check_serving(host, share, credentials)
    else:
        check_serving(host, share, credentials)


@pytest.mark.parametrize(
    "value, message",
    [("nopassword", "user:password"), (":secret-pass", "user:password"), ("ann:", "user:password"),
     ("ann:short", "shorter than 8")],
)
def test_bad_credentials_are_refused(value, message):
    with pytest.raises(UnsafeServe, match=message):
        parse_credentials(value, None)


def test_auth_file(tmp_path):
    f = tmp_path / "users"
    f.write_text("# team\nann:long-password\n\nbob:another-one\n")
    assert parse_credentials(None, str(f)) == [("ann", "long-password"), ("bob", "another-one")]
    f.write_text("ann:long-password\nbroken\n")
    with pytest.raises(UnsafeServe, match=r"users:2"):
        parse_credentials(None, str(f))
    with pytest.raises(UnsafeServe, match="no such file"):
        parse_credentials(None, str(tmp_path / "missing"))


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--share"]])
def test_the_app_refuses_to_start_exposed_without_auth(args, tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--workspace", str(tmp_path), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 2
    assert "--auth" in out.stderr


@pytest.fixture
def pickled_model(tmp_path, tiny_model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("opt_in", ["", "1"])
def test_pickle_checkpoints_load_only_after_an_opt_in(pickled_model, monkeypatch, opt_in):
    from app import models
    from app.security import ALLOW_PICKLE_ENV

    monkeypatch.setenv(ALLOW_PICKLE_ENV, opt_in)
    if opt_in:
        assert models.load_causal_lm(pickled_model).config.num_hidden_layers == 2
    else:
        with pytest.raises(models.ModelError, match="--allow-pickle"):
            models.load_causal_lm(pickled_model)


@pytest.mark.slow
@pytest.mark.parametrize("flag, env", [("--allow-pickle", "WORKBENCH_ALLOW_PICKLE"),
                                       ("--trust-remote-code", "WORKBENCH_TRUST_REMOTE_CODE")])
def test_risky_opt_ins_warn_and_reach_the_workers(flag, env, monkeypatch):
    from app.security import apply_opt_ins

    # setenv, not delenv: monkeypatch then records the variable, so the "1" apply_opt_ins sets is undone afterwards
    # (it leaked into later tests, which then unpickled checkpoints)
    monkeypatch.setenv(env, "")
    warnings = apply_opt_ins(flag == "--allow-pickle", flag == "--trust-remote-code")
    assert len(warnings) == 1 and flag in warnings[0]
    import os

    assert os.environ[env] == "1"  # inherited by `launch.py train` processes the UI starts
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), flag, "data", "check", "/no/such/file"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert f"warning: {flag}" in out.stderr


def test_no_opt_in_by_default(monkeypatch):
    from app.security import ALLOW_PICKLE_ENV, REMOTE_CODE_ENV, apply_opt_ins, opted_in

    for name in (ALLOW_PICKLE_ENV, REMOTE_CODE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert apply_opt_ins(False, False) == []
    assert not opted_in(ALLOW_PICKLE_ENV) and not opted_in(REMOTE_CODE_ENV)
