"""Scoring a given text under the proxy distribution (the paper's law: proxy.plausibility shapes what
decoding picks, not the likelihood of a given text): what `ProxyEngine.score` and `score_tokens`, lm-eval's
loglikelihood and the server's echo read."""
from __future__ import annotations

import torch

from core.errors import UserError
from proxy.streams import left_pad, open_stream


def score_batch(engine, requests, alphas=None, top_k: int = 0) -> list[dict]:
    """One batch of `ProxyEngine.score_tokens` requests: every stream runs once over context + continuation,
    right-aligned, and the proxy's log-probabilities are read at the continuation's positions. `top_k`:
    also the k likeliest tokens at each position, best first (the server's echo with `logprobs: k`)."""
    conts = [list(c) for _, _, c in requests]
    if any(len(c) == 0 for c in conts):
        raise UserError("a continuation to score encodes to no tokens")
    span = max(len(c) for c in conts)
    partial = [s.model for s in engine.streams.values() if not getattr(s.model, "covers_vocabulary", True)]
    if partial:
        raise UserError(f"scoring a given text needs the base's whole distribution, and {partial[0].url} gives its "
                        f"top {partial[0].top_logprobs} of {partial[0].vocab_size} tokens; serve it with every "
                        "log-probability (vLLM: --max-logprobs -1) and set load.base.top_logprobs (lm-eval: base_top_logprobs) "
                        "to the vocabulary")
    if engine.bridges:
        raise UserError("scoring a given text (loglikelihood, multiple choice, echo) with an expert of another "
                        "tokenizer family (proxy.cross) is not supported: its offset is scored over candidates as "
                        "it decodes; use generation tasks, or an expert of the base's tokenizer")
    logits = {}
    for key, stream in engine.streams.items():
        rows = []
        for (text, ctx, _), cont in zip(requests, conts):
            head = stream.encode(text) if stream.fmt is not None and text is not None else list(ctx)
            rows.append((head or stream.empty_prompt_ids) + cont)
        ids, mask = left_pad(rows, stream.pad_id)
        # right-aligned rows: position -(n+1) predicts the continuation's first token in every stream
        logits[key] = open_stream(stream.model).prefill(ids, mask, last=span + 1)[:, :-1]
    # the paper's law: proxy.plausibility shapes what decoding picks, not the likelihood of a given text
    logprobs = torch.log_softmax(engine.combine(logits, alphas, constrained=False), dim=-1)  # (B, span, V)
    results = []
    for row, cont in enumerate(conts):
        n = len(cont)
        target = torch.tensor(cont, device=logprobs.device)
        lp = logprobs[row, span - n :]
        token_lp = lp.gather(-1, target[:, None]).squeeze(-1)
        results.append(
            {
                "logprob": float(token_lp.sum()),
                "num_tokens": n,
                "is_greedy": bool((lp.argmax(-1) == target).all()),
                "token_logprobs": token_lp.tolist(),  # per continuation token
                "top_ids": lp.argmax(-1).tolist(),  # the proxy's own choice at each position
                "top_logprobs": lp.max(-1).values.tolist(),
            }
        )
        if top_k:
            top = lp.topk(min(top_k, lp.shape[-1]), dim=-1)  # (n, k)
            results[-1].update(top_k_ids=top.indices.tolist(), top_k_logprobs=top.values.tolist())
    return results
