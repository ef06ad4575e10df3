"""Helpers for browser tests: serve the app on loopback in its own process and drive Debian's Chromium."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic",
]
ARTIFACTS = ROOT / "test-artifacts"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None: Chromium is a system package, which apt may not reach."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (Debian package chromium; `make test` installs it where apt works)"
    return None


@contextmanager
def served_app(workspace: Path, extra_env: dict[str, str] | None = None, timeout: float = 90, *,
               args: tuple[str, ...] = (), url_host: str = "127.0.0.1"):
    """Start `launch.py` (with `args`, e.g. --auth) on a free loopback port; yields its URL; stops it afterwards.
    `url_host` is where the URL points: with --host ::1, [::1]."""
    port = free_port()
    log = open(workspace.parent / f"app-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "--workspace", str(workspace), "--port", str(port), *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})},
        start_new_session=True,
    )
    url = f"http://{url_host}:{port}/"

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            return False

    try:
        wait_for(answers, timeout, every=0.5, message="the app did not answer")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def chromium_page(width: int = 1280, height: int = 800):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def copy_artifact(src: Path, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(src, ARTIFACTS / name)
