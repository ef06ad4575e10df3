"""The compare tab (placeholder until its issue lands)."""
from __future__ import annotations

import gradio as gr

from components.shared import Shared


def build(shared: Shared) -> None:
    gr.Markdown("Coming soon.")
