"""The demo path in a real browser: the page a non-engineer sees, driven in headless Chromium on loopback."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from app.runs.quick_demo import demo_prompt
from tests.browser import ARTIFACTS, browser_missing, chromium_page, screenshot, served_app

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("browser") / "workspace"
    # The quick demo's run is cut to 2 steps here so the test walks the whole path in about two minutes;
    # bench/RESULTS.md records the full-length demo.
    with served_app(workspace, {"WORKBENCH_QUICK_DEMO_STEPS": "2"}) as url:
        yield url


def trainable_text(page) -> str:
    return page.get_by_text(re.compile(r"[\d,]+ trainable parameters")).first.inner_text()


def test_data_upload_and_live_estimate(app_url, tmp_path):
    rows = [{"instruction": f"Say hello number {i}", "input": "", "output": f"Hello {i}!"} for i in range(30)]
    rows.append({"instruction": "", "input": "", "output": "an answer with no question"})
    upload = tmp_path / "greetings.jsonl"
    upload.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with chromium_page() as page:
        page.goto(app_url)
        page.wait_for_selector("#quick-demo", timeout=60_000)
        # Data: upload a file and read the row-level validation summary.
        page.get_by_text("Add your own dataset").click()
        page.locator("input[type=file]").first.set_input_files(str(upload))
        page.get_by_text("30 rows kept, 1 left out").first.wait_for(timeout=90_000)
        screenshot(page, "1-data")
        # Method & Memory: the trainable count and the estimate move when r changes.
        page.get_by_role("tab", name="Method & Memory").click()
        page.get_by_text(re.compile(r"trainable parameters")).first.wait_for(timeout=60_000)
        before = trainable_text(page)
        rank = page.get_by_label("Rank r").first
        rank.fill("32")
        rank.press("Enter")
        page.wait_for_function(
            "before => !document.body.innerText.includes(before)", arg=before.split(" trainable")[0], timeout=30_000
        )
        after = trainable_text(page)
        assert before != after
        # r=8 -> r=32 on attention layers multiplies the LoRA parameters by 4
        count = lambda text: int(text.split(" trainable")[0].replace(",", "").replace("#", "").strip())
        assert count(after) == 4 * count(before)
        screenshot(page, "2-method")
        # Train: the controls keep their defaults after the Method tab's choice arrives (an event that shows or hides
        # the objective's controls once ticked "Train on the prompt too" by handing a list to a lone checkbox)
        page.get_by_role("tab", name="Train").click()
        prompt_too = page.get_by_label("Train on the prompt too")
        prompt_too.wait_for(timeout=30_000)
        page.wait_for_timeout(2000)  # the choice's change event has long arrived by now
        assert prompt_too.is_visible() and not prompt_too.is_checked()


def test_quick_demo_reaches_two_answers_side_by_side(app_url):
    started = time.time()
    with chromium_page() as page:
        page.goto(app_url)
        page.wait_for_selector("#quick-demo", timeout=60_000)
        page.click("#quick-demo")  # click 1: fills everything and queues the run
        # the Train tab shows the run's own settings (the preset's learning rate, the steps this test runs)
        page.wait_for_function("() => document.querySelector('#train-learning-rate input')?.value === '0.001'",
                               timeout=30_000)
        assert page.locator("#train-max-steps input").input_value() == "2"
        page.get_by_text("Finished.").first.wait_for(timeout=420_000)
        page.get_by_text(re.compile(r"step 2 of 2")).first.wait_for(timeout=60_000)
        screenshot(page, "3-train")
        page.get_by_role("tab", name="Compare").click()  # click 2: the new run is picked for you
        page.locator("#compare-runs").get_by_text("LoRA r=8").first.wait_for(timeout=60_000)
        page.get_by_text("Base model").first.wait_for(timeout=60_000)
        prompt = page.locator("#compare-prompt textarea")
        page.wait_for_function(
            "() => document.querySelector('#compare-prompt textarea').value.length > 0", timeout=30_000
        )
        assert prompt.input_value() == demo_prompt()  # a prompt the run did not train on
        page.click("#compare-send")  # click 3: the held-out prompt is already there
        try:
            page.get_by_text("Done.").first.wait_for(timeout=240_000)
        finally:
            screenshot(page, "4-compare")
        base = page.locator("#compare-pane-0 .bot").last.inner_text()
        adapted = page.locator("#compare-pane-1 .bot").last.inner_text()
    assert base.strip() and adapted.strip()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "quick-demo-seconds.txt").write_text(f"{time.time() - started:.1f}\n")


def test_narrow_window_keeps_the_tabs_usable(app_url):
    with chromium_page(width=420, height=800) as page:
        page.goto(app_url)
        page.wait_for_selector("#quick-demo", timeout=60_000)
        for name in ("Data", "Method & Memory", "Train", "Compare"):
            assert page.get_by_role("tab", name=name).count() >= 1 or page.get_by_text(name).count() >= 1
        screenshot(page, "5-narrow")
