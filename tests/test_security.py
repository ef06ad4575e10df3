"""Safe serving defaults: loopback unless credentials are given."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.security import UnsafeServe, check_serving, is_loopback, parse_credentials

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("example.org", False), ("", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


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
