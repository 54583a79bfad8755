"""Helpers shared by test modules: composing a training config the way the Hydra apps do."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# small, fast, deterministic: fp32, no checkpointing, a high learning rate so a few steps show
FAST = [
    "logger=none", "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
    "training.logging_steps=1", "training.learning_rate=1e-3", "training.activation_checkpointing=false",
    "training.warmup_steps=0", "training.max_length=64", "training.lr_scheduler_type=constant",
    "+training.args.disable_tqdm=true",
]


def make_cfg(app: str, model: str, outputs: Path, *overrides: str, steps: int = 4):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(app, overrides=[f"model={model}", f"paths.outputs={outputs}",
                                       f"training.max_steps={steps}", *FAST, *overrides])
