"""A finished job leaves `result.json` in its folder; running the same config there again returns it
instead of redoing the work (how a re-run sweep skips its finished jobs)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from proxy.io import atomic_write_json

RESULT_FILE = "result.json"



def safe_name(text: str, limit: int = 120) -> str:
    """A folder name for a sweep job from its overrides: a path in an override would nest folders,
    and a long name keeps a hash of the whole text so that jobs never share a folder."""
    name = re.sub(r"[^A-Za-z0-9=,.+_-]+", "_", str(text)).strip("_") or "job"
    if len(name) > limit:
        name = f"{name[: limit - 13]}-{hashlib.sha1(str(text).encode()).hexdigest()[:12]}"
    return name


OmegaConf.register_new_resolver("safe_name", safe_name, replace=True)


def config_hash(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    data.pop("logger", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_result(out_dir: str | Path, cfg: DictConfig) -> dict[str, Any] | None:
    path = Path(out_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return saved["metrics"] if saved.get("config_hash") == config_hash(cfg) else None


def skip_if_finished(out_dir: str | Path, cfg: DictConfig, what: str) -> dict[str, Any] | None:
    """The saved result of this job if it already finished with this config (and say so), else None."""
    done = finished_result(out_dir, cfg)
    if done is not None:
        print(f"already done, skipping: {what}")
    return done


def mark_finished(out_dir: str | Path, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / RESULT_FILE, {"config_hash": config_hash(cfg), "metrics": metrics})


def hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir
