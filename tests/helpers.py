"""Helpers shared by tests that start other processes: the one polling loop, a free port, the gloo check."""
from __future__ import annotations

import socket
import time
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, every: float = 0.05, *,
             message: str | Callable[[], object] = "", fail: bool = True) -> T | None:
    """Call `predicate` every `every` seconds until it returns something truthy, and return that value.

    At the timeout the test fails with `message` (a callable is called then, to show the state at that moment);
    fail=False returns None instead, for a phase that simply lasts at most `timeout` seconds. The predicate is
    called once more after the deadline, so a slow last sleep never turns a success into a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(every)
    if value:
        return value
    if not fail:
        return None
    detail = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout} s" + (f": {detail}" if detail else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_available() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_gloo_available()


needs_gloo = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with the gloo backend is not available")
