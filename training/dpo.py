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

import functools

import hydra
from omegaconf import DictConfig

from training.common import train
from training.entry import cli_main

# run(cfg, callbacks=()): train, save and register; the metrics, with `path` (the checkpoint folder) and `name`
run = functools.partial(train, algorithm="dpo")


@hydra.main(config_path="../conf", config_name="dpo", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return cli_main(cfg, "dpo")


if __name__ == "__main__":
    main()
