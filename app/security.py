"""Safe defaults for serving: where the app listens, loopback only unless the user sets credentials, and how
credentials are read."""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path


class ServeError(ValueError):
    """A serving setup that cannot or should not start; the message says what to change."""


class UnsafeServe(ServeError):
    """A serving setup that would expose the machine; the message says what to add."""


@dataclass(frozen=True)
class ServeAddress:
    """Where the app listens: `bind` is the bare address, `url_host` the form a URL needs (IPv6 in brackets, which is
    also the form Gradio's server_name takes: it builds its URLs from it and strips the brackets to bind)."""

    bind: str
    url_host: str


def parse_host(host: str) -> ServeAddress:
    """--host as given: an IPv4 or IPv6 address (with or without brackets) or a host name, without a port."""
    bare = host.strip()
    bracketed = bare.startswith("[") and bare.endswith("]")
    if bracketed:
        bare = bare[1:-1]
    if not bare:
        raise ServeError("--host is empty: give an address, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every "
                         "network interface)")
    try:
        version = ipaddress.ip_address(bare).version
    except ValueError:
        version = None
    if version == 6:
        return ServeAddress(bare, f"[{bare}]")
    if bracketed or any(c in bare for c in ":[]/ "):
        raise ServeError(f"--host {host}: not an address. Give the address alone, with the port in --port, e.g. "
                         f"--host 127.0.0.1, --host ::1 or --host 0.0.0.0")
    return ServeAddress(bare, bare)


def check_port(address: ServeAddress, port: int) -> None:
    """Bind once before the UI is built, so that a busy port or an address this machine does not have (IPv6 switched
    off, a name that does not resolve) is named at once, not after 20 s as Gradio's 'Cannot find empty port'."""
    family = socket.AF_INET6 if ":" in address.bind else socket.AF_INET  # as uvicorn chooses
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
            s.bind((address.bind, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            advice = "another program is listening there: stop it, or choose another port with --port"
        else:
            advice = "this machine has no such address: use --host 127.0.0.1, or an address of one of its interfaces"
        raise ServeError(f"cannot listen on {address.url_host} port {port} ({e.strerror or e}): {advice}") from None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def parse_credentials(auth: str | None, auth_file: str | None) -> list[tuple[str, str]]:
    """`user:password` from --auth, plus one such line per user from --auth-file (blank lines and # comments skipped)."""
    lines: list[tuple[str, str]] = []
    sources: list[tuple[str, str]] = []
    if auth:
        sources.append(("--auth", auth))
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise UnsafeServe(f"--auth-file {auth_file}: no such file")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                sources.append((f"{auth_file}:{n}", line.strip()))
    for where, value in sources:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise UnsafeServe(f"{where}: expected user:password")
        if len(password) < 8:
            raise UnsafeServe(f"{where}: the password for {user!r} is shorter than 8 characters")
        lines.append((user, password))
    return lines


def check_serving(host: str, share: bool, credentials: list[tuple[str, str]]) -> None:
    """Refuse to expose the app beyond this machine without credentials."""
    if credentials:
        return
    if share:
        raise UnsafeServe(
            "--share publishes this app on a public link: anyone with it could train and run models on this machine. "
            "Add --auth user:password (or --auth-file FILE) to share it."
        )
    if not is_loopback(host):
        raise UnsafeServe(
            f"--host {host} makes the app reachable from other machines. Add --auth user:password (or --auth-file "
            f"FILE), or keep the default --host 127.0.0.1."
        )


# Opt-ins live in the environment so that training workers started by the UI inherit the user's choice.
ALLOW_PICKLE_ENV = "WORKBENCH_ALLOW_PICKLE"
REMOTE_CODE_ENV = "WORKBENCH_TRUST_REMOTE_CODE"


def opted_in(name: str) -> bool:
    return os.environ.get(name) == "1"


def apply_opt_ins(allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    """Record the risky opt-ins for this process and its workers; returns the warnings to show."""
    warnings = []
    if allow_pickle:
        os.environ[ALLOW_PICKLE_ENV] = "1"
        warnings.append("--allow-pickle: .bin/.pt checkpoints will be unpickled, which can run code hidden in them. "
                        "Use it only for models whose source you trust.")
    if trust_remote_code:
        os.environ[REMOTE_CODE_ENV] = "1"
        warnings.append("--trust-remote-code: Python files shipped with a model will run on this machine. "
                        "Use it only for models whose source you trust.")
    return warnings
