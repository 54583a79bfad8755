"""A job's stages over worker processes: each stage starts as soon as the stages it needs have finished.

The demo's models are tiny, so one torch thread per process is fastest, and a 2-core machine sits half
idle running its stages one after another. With `jobs=2` two stages run at once, each in a spawned
process of its own (one torch thread, its output in a log file of its own); with `jobs=1` they run one
after another in this process, their output on the terminal. Every stage's function is the same either
way, and so are its results: each tuning seeds itself, and decoding is greedy.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str  # unique within the job; also its log file's name
    fn: Callable[..., Any]  # a module-level function, so that a spawned worker can import it
    args: tuple = ()
    needs: tuple[str, ...] = ()  # the stages whose outputs it reads


class StageFailed(RuntimeError):
    pass


def check_order(stages: list[Stage]) -> None:
    """Names are unique, and each stage needs only stages listed before it (so the list order is a
    valid one-at-a-time order, and no stage waits forever)."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"two stages are named {stage.name!r}")
        missing = [n for n in stage.needs if n not in seen]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing}, which no earlier stage is")
        seen.add(stage.name)


def run_stages(stages: list[Stage], jobs: int, log_dir: Path, report: Callable[[str], None] = print) -> dict:
    """Run every stage; returns {name: seconds}. The list order is the priority order: when a worker is
    free, it takes the first stage whose needs are met. A failed stage stops the job (the running ones
    finish, no new one starts) with StageFailed naming its log."""
    check_order(stages)
    seconds: dict[str, float] = {}
    if jobs <= 1:
        for stage in stages:
            seconds[stage.name] = _timed(stage.fn, stage.args)
            report(f"  {stage.name}: {seconds[stage.name]:.0f} s")
        return seconds
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running = list(stages), {}  # running: Future -> Stage
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no OpenMP state from this one
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_one_thread) as pool:
        while pending or running:
            for stage in [s for s in pending if set(s.needs) <= seconds.keys()][: jobs - len(running)]:
                pending.remove(stage)
                running[pool.submit(_logged, stage.fn, stage.args, log_dir / f"{stage.name}.log")] = stage
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                seconds[stage.name] = _result(future, stage, log_dir)
                report(f"  {stage.name}: {seconds[stage.name]:.0f} s")
    return seconds


def _result(future: Future, stage: Stage, log_dir: Path) -> float:
    try:
        return future.result()
    except Exception as exc:  # the worker's exception, pickled back
        raise StageFailed(f"stage {stage.name} failed: {exc}; its output: {log_dir / f'{stage.name}.log'}") from exc


def _one_thread() -> None:
    """One intra-op thread in each worker. torch.set_num_threads also sets MKL's count: OMP_NUM_THREADS=1
    alone left a second MKL thread per worker spinning (measured: load 3.9 on 2 cores, stages 3-5x slower)."""
    import torch

    torch.set_num_threads(1)


def _timed(fn: Callable[..., Any], args: tuple) -> float:
    started = time.time()
    fn(*args)
    return round(time.time() - started, 1)


def _logged(fn: Callable[..., Any], args: tuple, log: Path) -> float:
    """fn(*args) with this process's stdout and stderr (Python's and the C libraries' alike) in `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            return _timed(fn, args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
