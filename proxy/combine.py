"""The proxy step: pure functions of logits."""
from __future__ import annotations

from typing import Sequence

import torch


def shared_logits(logits: torch.Tensor, vocab_size: int, fold: Sequence[int] = (), into: int | None = None) -> torch.Tensor:
    """A model's logits (..., V_model) over the shared vocabulary (..., vocab_size), in float32.

    `fold` are ids the model ends on that lie beyond the shared vocabulary (a chat expert's own
    end-of-turn token, added to its tokenizer only): their probability joins the shared end id `into`
    (log-sum-exp), so the expert's wish to end its turn reaches the proxy instead of being dropped."""
    out = logits[..., :vocab_size].float()
    if fold and into is not None:
        out = out.clone()
        ends = torch.cat([out[..., into : into + 1], logits[..., list(fold)].float()], dim=-1)
        out[..., into] = torch.logsumexp(ends, dim=-1)
    return out


def proxy_logits(
    base: torch.Tensor,
    offsets: Sequence[tuple[float | torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """s_base + sum_i alpha_i * (s_expert_i - s_anti_i), in float32 on the base's device.

    base: (..., V); each offset is (alpha, expert (..., V), anti (..., V)), all over the shared vocabulary
    (`shared_logits`). alpha is a number, or a tensor that broadcasts against the logits (one per row).
    """
    scores = base.float()
    for alpha, expert, anti in offsets:
        if isinstance(alpha, (int, float)) and alpha == 0:
            continue
        expert = expert.to(scores.device, torch.float32)
        anti = anti.to(scores.device, torch.float32)
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
