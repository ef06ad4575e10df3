"""Times the one-click demo as a user walks it in headless Chromium: first page -> two different answers side by side.

Runs the full quick-demo preset on the embedded model (no step cut), counts the clicks, prints the wall time, and
saves the final page as assets/screenshot.png for the README.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quick_demo.py [--workspace DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WORKBENCH_MODELS_DIR", str(ROOT / "workspace" / "models"))

from tests.browser import chromium_page, served_app  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", help="a fresh folder is made when omitted")
    parser.add_argument("--screenshot", default=str(ROOT / "assets" / "screenshot.png"))
    args = parser.parse_args()
    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="quick-demo-")) / "workspace"
    workspace.parent.mkdir(parents=True, exist_ok=True)  # a --workspace folder that does not exist yet is made
    with served_app(workspace) as url, chromium_page() as page:
        page.goto(url)
        page.wait_for_selector("#quick-demo", timeout=60_000)
        started, clicks = time.time(), 0
        page.click("#quick-demo"); clicks += 1
        page.get_by_text("Finished.").first.wait_for(timeout=900_000)
        trained = time.time() - started
        page.get_by_role("tab", name="Compare").click(); clicks += 1
        page.locator("#compare-runs").get_by_text("LoRA r=8").first.wait_for(timeout=60_000)
        page.get_by_text("Base model").first.wait_for(timeout=60_000)
        page.wait_for_function("() => document.querySelector('#compare-prompt textarea').value.length > 0")
        page.click("#compare-send"); clicks += 1
        page.get_by_text("Done.").first.wait_for(timeout=300_000)
        total = time.time() - started
        base = page.locator("#compare-pane-0 .bot").last.inner_text().strip()
        adapted = page.locator("#compare-pane-1 .bot").last.inner_text().strip()
        page.screenshot(path=args.screenshot, full_page=False)
    print(f"clicks: {clicks} (no typing)")
    print(f"first click -> training finished: {trained:.0f} s")
    print(f"first click -> both answers complete: {total:.0f} s ({total / 60:.1f} min)")
    print(f"answers differ: {base != adapted}")
    print(f"base:    {base[:300]!r}")
    print(f"adapted: {adapted[:300]!r}")
    if not args.workspace:
        shutil.rmtree(workspace.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
