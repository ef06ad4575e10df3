"""The one-click demo: the quick-demo preset as a ready run, and a held-out prompt that shows what it learned."""
from __future__ import annotations

import os

from app.data import dataset as data
from app.presets import config_from_preset
from app.spec import RunConfig

PRESET = "quick-demo"
DEMO_DATASET = "pirate-persona"
# Lets the browser test walk the same path in seconds; users never set it.
STEPS_ENV = "WORKBENCH_QUICK_DEMO_STEPS"


def quick_demo_config() -> RunConfig:
    steps = os.environ.get(STEPS_ENV)
    return config_from_preset(PRESET, {"max_steps": int(steps) if steps else None})


def demo_card() -> data.DemoCard:
    return next(c for c in data.demo_datasets() if c.name == DEMO_DATASET)


def demo_prompt() -> str:
    """A prompt that is not in the training rows, so the answer shows the learned style, not a memorised row."""
    return demo_card().held_out_prompts[0]
