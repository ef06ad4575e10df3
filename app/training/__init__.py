"""The training worker (`launch.py train RUN.yaml`) and what it is made of: loading, batches per step, attention for
packed rows, recording and checkpoints, hardware probes, data parallelism and the CPU/GPU LoRA speed-ups."""
