"""Where each model goes, and in which dtype a 4-bit model computes: pure decisions from what the
machine has, so that a test can check them as if CUDA were there.

Decoding (`proxy.run`, `eval.run`, lm-eval, the benchmark):
- a `load.<role>.device_map` the user gives always wins;
- no GPU: every model on the CPU;
- one GPU: every model on it, whole;
- several GPUs: the base spread over all of them (`device_map="auto"`: a 70B in 4-bit does not fit one
  card next to two 7B models), and each small model (expert, anti-expert) whole on the GPU with the
  most free memory when it loads, so its forward never hops between cards.
The proxy scores are combined on the base's device (`proxy.combine` moves the small models' logits).

Training (`training.sft|dpo`): no device map, so that the Trainer (and `accelerate launch`: DDP, FSDP,
ZeRO-3) places the model; a 4-bit model must be placed at load, on the process's own GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import UserError

SMALL_ROLES = ("expert", "anti_expert")


@dataclass(frozen=True)
class Machine:
    """What placement depends on: the GPUs, their free memory (bytes) and the distributed launch."""

    gpus: int = 0
    free: tuple[int, ...] = ()
    bf16: bool = False
    world_size: int = 1  # processes started by `accelerate launch` / torchrun
    local_rank: int = 0

    @classmethod
    def here(cls) -> "Machine":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if not torch.cuda.is_available():
            return cls(world_size=world, local_rank=rank)
        n = torch.cuda.device_count()
        return cls(gpus=n, free=tuple(torch.cuda.mem_get_info(i)[0] for i in range(n)),
                   bf16=torch.cuda.is_bf16_supported(), world_size=world, local_rank=rank)


def decoding_device_map(role: str, given: Any, machine: Machine) -> Any:
    """The device map of a model loaded for decoding in `role` (base, expert or anti_expert)."""
    if given:
        return given
    if machine.gpus == 0:
        return None
    if machine.gpus == 1:
        return {"": 0}
    if role in SMALL_ROLES:
        return {"": max(range(machine.gpus), key=lambda i: machine.free[i])}
    return "auto"


def training_device_map(given: Any, quantized: bool, machine: Machine) -> Any:
    """The device map of the model to tune: none (the Trainer places it), except for a 4-bit model."""
    if given:
        if machine.world_size > 1:
            raise UserError(f"load.device_map={given} cannot be used under a distributed launch of "
                            f"{machine.world_size} processes (each process holds its own copy or shard); drop it")
        return given
    if not quantized:
        return None
    return {"": machine.local_rank} if machine.gpus else "cpu"


def compute_dtype(given: torch.dtype | str, machine: Machine) -> torch.dtype:
    """The dtype a 4-bit model computes in: the one given, else bfloat16 (float16 without bf16 support) on a
    GPU, float32 on the CPU."""
    if isinstance(given, torch.dtype):
        return given
    if machine.gpus == 0:
        return torch.float32
    return torch.bfloat16 if machine.bf16 else torch.float16
