"""Fake finished runs for the Compare tests and benchmark: adapters and full models that differ from the base, saved
in run folders the way a real run leaves them, without running the trainer."""
from __future__ import annotations

from pathlib import Path

from app.runs.store import COMPLETED, RunStore
from app.spec import RunConfig


def perturbed_lora(base_model, r: int, seed: int, targets: str = "all-linear", scale: float = 0.5, **config):
    """`base_model` wrapped in a fresh LoRA adapter whose B is random (B starts at zero, which would equal the base);
    a DoRA adapter's magnitudes are scattered too."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    peft_model = get_peft_model(
        base_model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, lora_dropout=0.0, **config)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale / r ** 0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + torch.randn_like(p) * scale)
    return peft_model.eval()


def save_lora_run(store: RunStore, base_dir: Path, model_ref: str, run_id: str, r: int, seed: int,
                  state: str = COMPLETED, targets: str = "all-linear", scale: float = 0.5, **config) -> Path:
    """A run folder whose final/ holds a perturbed LoRA adapter for the model in `base_dir`; returns final/."""
    from transformers import AutoModelForCausalLM

    method_args = {"r": r, "alpha": 2 * r, "targets": targets, **({"dora": True} if config.get("use_dora") else {})}
    store.create(RunConfig(model=model_ref, method="lora", method_args=method_args, run_id=run_id))
    adapter = perturbed_lora(AutoModelForCausalLM.from_pretrained(base_dir), r, seed, targets, scale, **config)
    adapter.save_pretrained(store.final_dir(run_id), safe_serialization=True)
    store.update_status(run_id, state=state)
    return store.final_dir(run_id)


def save_full_run(store: RunStore, base_dir: Path, model_ref: str, run_id: str, seed: int, scale: float = 0.02) -> Path:
    """A full fine-tune's run folder: the base with every weight nudged, saved with its tokenizer in final/."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store.create(RunConfig(model=model_ref, method="full", run_id=run_id))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(store.final_dir(run_id), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(store.final_dir(run_id))
    store.update_status(run_id, state=COMPLETED)
    return store.final_dir(run_id)
