"""Gradio tabs: layout and event wiring only; every decision lives in app/."""
