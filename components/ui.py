"""Assembles the page: the model picker on top, then one tab per step (data -> method -> train -> compare)."""
from __future__ import annotations

import gradio as gr

from app import methods
from app import models
from app.handoff import MethodChoice
from app.runs import quick_demo
from app.runs.jobs import attach_estimate, start_supervisor
from app.spec import ConfigError
from app.workspace import Workspace
from components import compare_tab, data_tab, method_tab, train_tab
from components.shared import Shared

TITLE = "Fine-tuning workbench"


def model_summary(ref: str, workspace: Workspace) -> str:
    try:
        facts = methods.cached_inventory(ref, str(workspace.models))
    except models.ModelError as e:
        return f"**Model:** {e}"
    except Exception as e:  # noqa: BLE001 - a bad folder or config must not break the page
        return f"**Model:** could not read its config ({type(e).__name__}: {e})"
    return (
        f"**{facts.total / 1e6:,.1f}M parameters** · {facts.model_type} · {facts.layers} layers · hidden "
        f"{facts.hidden} · {facts.heads} heads ({facts.kv_heads} KV) · vocab {facts.vocab:,}"
    )


def start_quick_demo(workspace: Workspace):
    """Queue the quick-demo run and fill the page to match: embedded model, pirate data, the Train tab in view,
    and a held-out prompt waiting in the Compare tab."""
    try:
        config = quick_demo.quick_demo_config()
    except ConfigError as e:
        gr.Warning(f"The quick demo could not start: {e}")
        return gr.update(), gr.update(), gr.update(), gr.update()
    attach_estimate(config, workspace.models)
    start_supervisor(workspace).submit([config])
    gr.Info("Quick demo queued: the pirate persona, LoRA r=8. Watch the loss here; when it finishes, open Compare and press Send.")
    return models.EMBEDDED, config.dataset, gr.Tabs(selected="train"), quick_demo.demo_prompt()


# What the quick demo sets beside the Train tab's controls: shared controls other tabs render.
QUICK_DEMO_SHARED = ("batch_size", "grad_accum", "cutoff_len", "val_split", "system_prompt")


def quick_demo_settings(names: list[str]) -> list:
    """The quick-demo run's values for the named RunConfig fields, so the page shows what the run uses."""
    try:
        config = quick_demo.quick_demo_config()
    except ConfigError:
        return [gr.update() for _ in names]
    return [getattr(config, name) for name in names]


def build_ui(workspace: Workspace) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nUpload instructions, pick a method, see the memory it needs, train, then compare.")
        with gr.Row():
            model = gr.Dropdown(
                choices=models.model_choices(workspace.models),
                value=models.EMBEDDED,
                label="Model",
                info="The embedded SmolLM2-135M works offline. Type a local folder path or a hub id (org/name) to use another.",
                allow_custom_value=True,
                scale=3,
            )
            with gr.Column(scale=2):
                summary = gr.Markdown(model_summary(models.EMBEDDED, workspace))
                quick = gr.Button(
                    "Quick demo: teach the model to talk like a pirate", variant="primary", elem_id="quick-demo",
                )
                gr.Markdown(
                    "One click fills everything in and starts a short run (a few minutes on a laptop CPU). "
                    "Then open **Compare** and press **Send**."
                )
        shared = Shared(
            workspace=workspace,
            model=model,
            cutoff_len=gr.Slider(
                32, 4096, value=256, step=32, label="Cutoff length (tokens)", render=False,
                info="Longer rows are cut here. Longer means more memory and slower steps.",
            ),
            batch_size=gr.Slider(
                1, 64, value=4, step=1, label="Batch size", render=False,
                info="Rows per step. Higher is faster per row but needs more memory.",
            ),
            grad_accum=gr.Slider(
                1, 64, value=1, step=1, label="Gradient accumulation", render=False,
                info="Steps added up before one update: a bigger effective batch with no extra memory.",
            ),
            dataset=gr.State(""),
            val_dataset=gr.State(None),
            val_split=gr.Slider(
                0, 0.5, value=0.1, step=0.05, label="Validation share", render=False,
                info="Rows held out to measure loss on data the model did not train on.",
            ),
            method_choice=gr.State(MethodChoice()),
            system_prompt=gr.Textbox(
                "", label="System prompt", lines=2, render=False, elem_id="data-system-prompt",
                placeholder="e.g. You are the help desk of Brambleway Bikes. Answer briefly.",
                info=data_tab.SYSTEM_INFO,
            ),
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                dataset_picker = data_tab.build(shared)
            with gr.Tab("Method & Memory", id="method"):
                method_tab.build(shared)
            with gr.Tab("Train", id="train"):
                hyper = train_tab.build(shared)
            with gr.Tab("Compare", id="compare") as compare:
                compare_message = compare_tab.build(shared, compare)
        model.change(lambda ref: model_summary(ref, workspace), model, summary)
        filled = list(hyper) + list(QUICK_DEMO_SHARED)
        quick.click(lambda: start_quick_demo(workspace), None, [model, dataset_picker, tabs, compare_message]).then(
            lambda: quick_demo_settings(filled), None,
            list(hyper.values()) + [getattr(shared, name) for name in QUICK_DEMO_SHARED])
    return demo
