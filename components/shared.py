"""Controls that several tabs read, created once by ui.py and rendered by the tab that owns them."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app.workspace import Workspace


@dataclass
class Shared:
    workspace: Workspace
    model: gr.Dropdown  # model reference: "embedded", a local folder, a hub id or "config:NAME"
    cutoff_len: gr.Slider  # rendered by the Data tab; the memory estimate reads it as the sequence length
    batch_size: gr.Slider  # rendered by the Method & Memory tab; the Data tab reads it for steps per epoch
    grad_accum: gr.Slider  # rendered by the Train tab; the Data tab's steps per epoch and the estimate read it
    dataset: gr.State  # path of the normalised training file chosen in the Data tab ("" = none yet)
    val_dataset: gr.State  # path of a separate validation file, or None
    val_split: gr.Slider  # rendered by the Data tab
    method_choice: gr.State  # app.handoff.MethodChoice: the Method tab's settings and the estimate it showed
    system_prompt: gr.Textbox  # rendered by the Data tab; the dataset-level system prompt training and Compare use
