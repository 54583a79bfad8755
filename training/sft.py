"""Supervised fine-tuning of an expert with TRL's SFTTrainer (loss on the completion only).

    python -m training.sft +task=triviaqa                                   # preset model=llama2-7b
    python -m training.sft +task=jsonl task.path=data.jsonl model=path/to/small training.max_steps=20
    python -m training.sft +task=gsm8k peft=lora                            # peft=qlora: 4-bit base
    python -m training.sft -m +task=triviaqa training.learning_rate=1e-5,2e-5   # one expert per value

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
run = functools.partial(train, algorithm="sft")


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return cli_main(cfg, "sft")


if __name__ == "__main__":
    main()
