"""Fine-tuning workbench: all logic, testable without a browser or GPU. Never imports gradio."""
