"""The one body of `python -m training.sft` and `python -m training.dpo`: the two differ only in the
algorithm TRL trains with and in their conf (conf/dpo.yaml is conf/sft.yaml with DPO's training group).
Each module keeps its own `@hydra.main`, which Hydra needs to find the config by name."""
from __future__ import annotations

from omegaconf import DictConfig

from core.errors import exit_on_user_error
from training.common import train


@exit_on_user_error
def cli_main(cfg: DictConfig, algorithm: str) -> float:
    """The body of `python -m training.sft|dpo`: train, then print the checkpoint folder on the last line."""
    metrics = train(with_hydra_output_dir(cfg), algorithm)
    print(metrics["path"], flush=True)
    return float(metrics.get("last_loss") or 0.0)


def with_hydra_output_dir(cfg: DictConfig) -> DictConfig:
    """A user who chose the run folder (hydra.run.dir=...) gets the job there."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("output_dir"):
        return cfg
    try:
        hc = HydraConfig.get()
    except ValueError:
        return cfg
    if any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra):
        cfg.output_dir = hc.runtime.output_dir
    return cfg
