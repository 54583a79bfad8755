"""The proxy step: pure functions of logits."""
from __future__ import annotations

import math
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
    plausibility: float = 0.0,
) -> torch.Tensor:
    """s_base + sum_i alpha_i * (s_expert_i - s_anti_i), in float32 on the base's device.

    base: (..., V); each offset is (alpha, expert (..., V), anti (..., V)), all over the shared vocabulary
    (`shared_logits`), or (alpha, offset (..., V), None): an offset given whole (proxy.cross). alpha is a
    number, or a tensor that broadcasts against the logits (one per row).
    plausibility > 0: only tokens that the base or a steering expert finds plausible keep their score, the
    others drop by RULED_OUT (`plausible_tokens`), in every row some pair steers (alpha != 0); 0 keeps
    every token, the paper's rule.
    """
    base = base.float()
    scores = base
    experts = []
    whole = torch.zeros((), dtype=torch.bool, device=scores.device)  # rows an offset given whole steers
    for alpha, expert, anti in offsets:
        if isinstance(alpha, (int, float)) and alpha == 0:
            continue
        if anti is None:  # an offset given whole (a pair of another tokenizer, proxy.cross): no plausible set of its own
            scores = scores + alpha * expert.to(scores.device, torch.float32)
            whole = whole | ((alpha != 0).to(scores.device) if isinstance(alpha, torch.Tensor) else torch.ones_like(whole))
            continue
        expert = expert.to(scores.device, torch.float32)
        anti = anti.to(scores.device, torch.float32)
        scores = scores + alpha * (expert - anti)
        experts.append((alpha, expert))
    if plausibility > 0 and (experts or bool(whole.any())):
        keep = plausible_tokens(base, plausibility)
        steered = whole  # per row, where alphas are per row
        for alpha, expert in experts:
            on = (alpha != 0).to(scores.device) if isinstance(alpha, torch.Tensor) else torch.ones_like(steered)
            keep = keep | (plausible_tokens(expert, plausibility) & on)  # a pair at alpha 0 adds no tokens
            steered = steered | on
        scores = torch.where(keep | ~steered, scores, scores - RULED_OUT)  # an unsteered row is the base's own law
    return scores


# What a token outside the plausible set loses: its probability underflows to 0 (exp(-1e4) in float32) while
# the proxy's order among such tokens stays, so that where a decoding rule removes every plausible token
# (min_new_tokens after a text both models are sure has ended, suppress_tokens) the proxy's next best is
# taken, and every score stays finite.
RULED_OUT = 1e4


def plausible_tokens(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """True where a model gives the token at least `fraction` of its own top token's probability.

    The adaptive plausibility constraint of contrastive decoding (Li et al., 2023); `proxy_logits` keeps the
    tokens plausible to the base or to a steering expert: a token the base knows (a fact the small expert
    never learnt) or an expert wants (the tuned format) stays; a token that only the offset's tail lifts,
    where the anti-expert rules out what the expert merely doubts, does not. (..., V) -> (..., V) bool.
    """
    logp = torch.log_softmax(logits, dim=-1)
    return logp >= logp.amax(dim=-1, keepdim=True) + math.log(fraction)


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
        "offset_norm": (proxy - base).clamp_min(-RULED_OUT / 2).norm(dim=-1),  # the steering, not RULED_OUT
        "kl_proxy_base": kl.clamp_min(0.0),
    }
