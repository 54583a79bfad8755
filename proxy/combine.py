"""The proxy step: a pure function of logits."""
from __future__ import annotations

from typing import Sequence

import torch


def proxy_logits(
    base: torch.Tensor,
    offsets: Sequence[tuple[float, torch.Tensor, torch.Tensor]],
    vocab_size: int,
) -> torch.Tensor:
    """s_base + sum_i alpha_i * (s_expert_i - s_anti_i), in float32 over the first `vocab_size` ids.

    base: (..., V_base); each offset is (alpha, expert (..., V_e), anti (..., V_a)), every V >= vocab_size.
    Widths beyond vocab_size are padding rows of an embedding matrix and are dropped.
    Returns (..., vocab_size) float32 on the base's device.
    """
    scores = base[..., :vocab_size].float()
    for alpha, expert, anti in offsets:
        if alpha == 0:
            continue
        expert = expert[..., :vocab_size].to(scores.device, torch.float32)
        anti = anti[..., :vocab_size].to(scores.device, torch.float32)
        scores = scores + alpha * (expert - anti)
    return scores


def token_diagnostics(base: torch.Tensor, proxy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: the base's top token, the proxy's, whether it changed, the offset's L2 size and KL(proxy || base).

    base and proxy: (B, V) float32 over the same vocabulary. Returns tensors of shape (B,).
    """
    base_top = base.argmax(-1)
    proxy_top = proxy.argmax(-1)
    log_p_proxy = torch.log_softmax(proxy, -1)
    log_p_base = torch.log_softmax(base, -1)
    kl = (log_p_proxy.exp() * (log_p_proxy - log_p_base)).sum(-1)
    return {
        "base_top": base_top,
        "proxy_top": proxy_top,
        "changed": base_top != proxy_top,
        "offset_norm": (proxy - base).norm(dim=-1),
        "kl_proxy_base": kl.clamp_min(0.0),
    }
