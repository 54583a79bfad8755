"""A finished job leaves `result.json` in its folder; running it there again returns that result instead
of redoing the work (how a re-run sweep skips its finished jobs) only while its config and what it read
are unchanged: the digest of its input files (prompts, task data, the models' weights, configs and
cards) is part of the record, so an edited prompt file or a checkpoint retrained at the same path
makes the job run again."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from core.files import atomic_write_json

RESULT_FILE = "result.json"
CHECKPOINT_FILE = "checkpoint.jsonl"  # what an unfinished job has done so far (Checkpoint)
HASHED_BYTES = 16 << 20  # files up to this size are hashed whole; larger ones (weights) by size and mtime
# a checkpoint's card gains scores as evaluations finish; what of it matters to a run (the anti-expert,
# the prompt format) enters the run's inputs by value instead (proxy.run.run_inputs)
VOLATILE = {"card.json"}


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


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASHED_BYTES:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inputs_digest(inputs: Iterable[str | Path | None]) -> str:
    """A digest of every file the inputs name (a file, or every file below a folder); an input that is no
    local path (a hub id) counts by its name."""
    h = hashlib.sha256()
    for item in sorted({str(i) for i in inputs if i}):
        path = Path(item).expanduser()
        h.update(item.encode())
        if path.is_file():
            h.update(_file_digest(path).encode())
        elif path.is_dir():
            for f in sorted(p for p in path.rglob("*")
                            if p.is_file() and not p.name.startswith(".") and p.name not in VOLATILE):
                h.update(f"{f.relative_to(path)}={_file_digest(f)}".encode())
    return h.hexdigest()[:16]


def finished_result(out_dir: str | Path, cfg: DictConfig, digest: str = "") -> dict[str, Any] | None:
    path = Path(out_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = saved.get("config_hash") == config_hash(cfg) and saved.get("inputs_digest", "") == digest
    return saved["metrics"] if same else None


def skip_if_finished(out_dir: str | Path, cfg: DictConfig, what: str, digest: str = "") -> dict[str, Any] | None:
    """The saved result of this job if it already finished with this config and these inputs (and say so)."""
    done = finished_result(out_dir, cfg, digest)
    if done is not None:
        print(f"already done, skipping: {what}")
    return done


def mark_finished(out_dir: str | Path, cfg: DictConfig, metrics: dict[str, Any], digest: str = "") -> None:
    atomic_write_json(Path(out_dir) / RESULT_FILE,
                      {"config_hash": config_hash(cfg), "inputs_digest": digest, "metrics": metrics})


def run_job(cfg: DictConfig, out_dir: str | Path, job_type: str, digest: str, what: str,
            work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Every stage's job, in one place: its saved result if it already finished with this config and these
    inputs (`digest`); else `work(tracker)` inside the stage's W&B run (closed whatever happens), and the
    result recorded (by the first process of a distributed launch) for the next run to find."""
    done = skip_if_finished(out_dir, cfg, what, digest)
    if done is not None:
        return done
    from core.tracking import tracked

    # the same job from the same inputs (an interrupted run, run again) continues one W&B run
    run_id = hashlib.sha256(f"{Path(out_dir).resolve()}|{config_hash(cfg)}|{digest}".encode()).hexdigest()[:16]
    with tracked(cfg, job_type=job_type, run_dir=str(out_dir), run_id=run_id) as tracker:
        metrics = work(tracker)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        mark_finished(out_dir, cfg, metrics, digest)
    return metrics


def hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


class Checkpoint:
    """What a job has finished so far, one JSON record a line, appended as each piece finishes, so that the
    same job run again after an interruption (same config, same inputs) goes on from there instead of
    starting over. A checkpoint of another config or other inputs is dropped, as is a last line cut short."""

    def __init__(self, path: str | Path, cfg: DictConfig, digest: str = ""):
        self.path = Path(path)
        self.key = f"{config_hash(cfg)}|{digest}"

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        try:
            if not lines or json.loads(lines[0]).get("checkpoint") != self.key:
                return []
        except (json.JSONDecodeError, AttributeError):
            return []
        records = []
        for line in lines[1:]:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written when the job was killed
                break
        return records

    def start(self, kept: list[dict[str, Any]]) -> None:
        """Begin the file anew with the records kept from an earlier run (none: a fresh start)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(json.dumps({"checkpoint": self.key}) + "\n")
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
