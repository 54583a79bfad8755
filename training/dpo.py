"""Preference tuning of an expert with TRL's DPOTrainer; the reference is the model before tuning.

    python -m training.dpo +task=ultrafeedback                              # preset model=llama2-7b
    python -m training.dpo +task=jsonl task.path=pairs.jsonl model=path/to/small training.max_steps=20
    python -m training.dpo +task=ultrafeedback peft=lora                    # reference: adapter off
    python -m training.dpo -m +task=ultrafeedback training.beta=0.05,0.1   # one expert per value

Saves and registers the checkpoint (its card names the model it was tuned from, proxy.run's default
anti-expert) and prints its folder on the last line. The same command again resumes a killed run
or skips a finished one.
"""
from __future__ import annotations

from typing import Any, Sequence

import hydra
from omegaconf import DictConfig

from core.errors import exit_on_user_error
from training.common import cli_main, train


def run(cfg: DictConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train, save and register; the metrics, with `path` (the checkpoint folder) and `name`."""
    return train(cfg, "dpo", callbacks=callbacks)


@hydra.main(config_path="../conf", config_name="dpo", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return cli_main(cfg, "dpo")


if __name__ == "__main__":
    main()
