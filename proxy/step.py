"""One decoding step: from the streams' logits to each row's next token. Every loop takes its tokens
here: the plain engine (one token a round), the speculative engine (a round checks k drafts with the
same pieces) and the server's live batch (rows joining and leaving between steps).

    scores = engine.combine(logits, alphas)   s_base + alpha * (s_expert - s_anti), float32   (proxy.combine)
    scores = rows.process(scores)             transformers' processors, as the base's `generate` builds them
    tokens = rows.pick(scores)                argmax, or a sample from softmax(scores)        (DecodeRules.pick)
    rows.record(tokens, ...)                  for rows that ask: diagnostics, log-probabilities
    rows.advance(tokens)                      a row ends on a stop id, a stop string or its budget

A row carries its own rules (settings, processors, sampler), so requests with different settings share
a batch; rows that share one rules object and one rectangle of ids (the plain engine's batch) go
through the processors in one call, as in `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from proxy.combine import token_diagnostics
from proxy.decoding import DecodeRules
from proxy.text import final_text, generated_text


@dataclass
class Generation:
    prompt: Any  # the prompt as given: text, or chat messages
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    diagnostics: list[dict] | None = None


class Row:
    """One sequence being decoded: its prompt as the processors read it, its rules, what it generated."""

    def __init__(self, rules: DecodeRules, prompt: Sequence[int] | torch.Tensor, prompt_mask: torch.Tensor | None = None,
                 alpha: float | None = None, diagnostics: bool = False, logprobs: int | None = None):
        self.rules = rules
        self.prompt = torch.as_tensor(prompt, dtype=torch.long).to(rules.device)  # (W,): in a batch, with its left padding
        self.prompt_mask = torch.ones(1, len(self.prompt), dtype=torch.long) if prompt_mask is None else prompt_mask
        self.alpha = alpha  # the first pair's strength for this row; None: the engine's
        self.diagnostics = diagnostics
        self.logprobs = logprobs  # log-probabilities of this many top tokens at each step
        self.generated: list[int] = []
        self.reason: str | None = None
        self.records: list[dict] = []  # one per token, for a row that asks for diagnostics or logprobs
        self._processors = None

    @property
    def recording(self) -> bool:
        return self.diagnostics or self.logprobs is not None

    @property
    def processors(self):
        """The processors of this row alone (its own padding, its own length), built at first use."""
        if self._processors is None:
            self._processors = self.rules.processors(self.prompt_mask)
        return self._processors

    def ids(self) -> torch.Tensor:
        return torch.cat([self.prompt, torch.tensor(self.generated, dtype=torch.long, device=self.prompt.device)])

    def take(self, tokens: Sequence[int]) -> int:
        """Append tokens until the row ends; how many it took."""
        taken = 0
        for token in tokens:
            if self.reason is not None:
                break
            self.generated.append(int(token))
            self.reason = self.rules.finish_reason(self.generated)
            taken += 1
        return taken

    def text(self, tokenizer) -> str:
        """The text-generation pipeline's text of what the row generated, cut at its first stop string."""
        return final_text(tokenizer, self.generated, self.reason, self.rules.stop_strings.stop)

    def generation(self, prompt, tokenizer) -> Generation:
        """The finished row: its text and its ids (without the id it ended on)."""
        ids = self.generated[:-1] if self.reason == "eos" else list(self.generated)
        return Generation(prompt, self.text(tokenizer), ids, self.reason, self.records if self.diagnostics else None)


class Rows:
    """The rows of a batch, in the order of the models' batch dimension.

    `seq` (B, W + steps) is kept while every row advances one token a step (an ended row by padding), so
    that rows sharing one rules object go through the processors in one call over it, as in `generate`;
    rows advancing by different numbers (speculative rounds, a live batch) go through them one by one."""

    def __init__(self, rows: Sequence[Row], device, pad_id: int, seq: torch.Tensor | None = None,
                 batch_processors=None):
        self.rows = list(rows)
        self.device, self.pad_id = device, pad_id
        self.seq = seq
        self.batch_processors = batch_processors  # the processors of the whole rectangle `seq`
        self.last: torch.Tensor | None = None  # (B,) each row's token of the last step (padding where it ended)

    @classmethod
    def batch(cls, rules: DecodeRules, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pad_id: int,
              diagnostics: bool = False, aligned: bool = True) -> "Rows":
        """One engine batch: left-padded prompts (B, W) under one set of rules; `aligned`: one token a step."""
        rows = [Row(rules, prompt_ids[r], prompt_mask[r : r + 1], diagnostics=diagnostics) for r in range(len(prompt_ids))]
        if not aligned:
            return cls(rows, rules.device, pad_id)
        return cls(rows, rules.device, pad_id, prompt_ids.to(rules.device), rules.processors(prompt_mask))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> Row:
        return self.rows[r]

    @property
    def active(self) -> torch.Tensor:
        return torch.tensor([row.reason is None for row in self.rows], dtype=torch.bool, device=self.device)

    @property
    def done(self) -> bool:
        return all(row.reason is not None for row in self.rows)

    def live(self) -> list[int]:
        return [r for r, row in enumerate(self.rows) if row.reason is None]

    def groups(self) -> list[tuple[DecodeRules, list[int]]]:
        """The rows by the rules they share, in batch order."""
        out: dict[int, tuple[DecodeRules, list[int]]] = {}
        for r, row in enumerate(self.rows):
            out.setdefault(id(row.rules), (row.rules, []))[1].append(r)
        return list(out.values())

    def alphas(self, pairs) -> list | None:
        """Each pair's strength per row (B, 1) where some row sets its own; None: every row takes the pairs'."""
        if all(row.alpha is None for row in self.rows):
            return None
        first = [[pairs[0].alpha if row.alpha is None else row.alpha] for row in self.rows]
        return [torch.tensor(first, device=self.device)] + [p.alpha for p in pairs[1:]]

    # -- the pieces of a step ------------------------------------------------------------------------
    def process(self, scores: torch.Tensor, drafts: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """transformers' processors over scores (B, n, V) whose position i follows each row's ids and the
        row's first start + i drafts (B, m)."""
        groups = self.groups()
        if len(groups) == 1:
            rules, members = groups[0]
            return self._process(rules, members, scores, drafts, start) if rules.processes else scores
        out = scores.clone()
        for rules, members in groups:
            if rules.processes:
                out[members] = self._process(rules, members, scores, drafts, start)
        return out

    def _process(self, rules: DecodeRules, members: list[int], scores, drafts, start) -> torch.Tensor:
        whole = len(members) == len(self.rows)
        sub = scores if whole else scores[members]
        m, n, v = sub.shape
        if rules.position_free:  # nothing reads the ids: one call for every position
            flat = sub.reshape(m * n, v)
            return rules.probe(flat.new_zeros((m * n, 1), dtype=torch.long), flat).reshape(m, n, v)
        if whole and self.seq is not None and drafts is None and n == 1:
            return self.batch_processors(self.seq, sub[:, 0])[:, None]
        out = sub.clone()
        for j, r in enumerate(members):
            row = self.rows[r]
            if row.reason is None:
                head = row.ids()
                for i in range(n):
                    ids = head if drafts is None else torch.cat([head, drafts[r, : start + i].to(head.device)])
                    out[j, i] = row.processors(ids[None], sub[j, i][None])[0]
        return out

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """Each row's token (B,) from processed scores (B, V), by its rules (greedy, or its own sampler)."""
        groups = self.groups()
        if len(groups) == 1:
            return groups[0][0].pick(scores)
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=scores.device)
        for rules, members in groups:
            tokens[members] = rules.pick(scores[members])
        return tokens

    def record(self, tokens: torch.Tensor, base: torch.Tensor, scores: torch.Tensor, tokenizer) -> None:
        """For each row that asks, what its token was chosen from: the base's own top token and the
        proxy's, whether the proxy changed it, the offset's size and KL(proxy || base) (diagnostics); the
        token's log-probability and the top alternatives under the proxy distribution, before the
        processors (logprobs: `top_logprobs`, [(text, logprob, id)] best first; the id because tokens that
        print alike differ). base, scores: (B, V) over the shared vocabulary."""
        asking = [r for r, row in enumerate(self.rows) if row.reason is None and row.recording]
        if not asking:
            return
        diag = token_diagnostics(base.float(), scores) if any(self.rows[r].diagnostics for r in asking) else None
        logprobs = torch.log_softmax(scores.float(), -1) if any(self.rows[r].logprobs is not None for r in asking) else None
        for r in asking:
            row, token = self.rows[r], int(tokens[r])
            entry: dict[str, Any] = {"token_id": token}
            if row.diagnostics:
                base_top, proxy_top = int(diag["base_top"][r]), int(diag["proxy_top"][r])
                entry.update(base_top_id=base_top, proxy_top_id=proxy_top,
                             base_top=tokenizer.convert_ids_to_tokens(base_top),
                             proxy_top=tokenizer.convert_ids_to_tokens(proxy_top),
                             changed=bool(diag["changed"][r]), offset_norm=round(float(diag["offset_norm"][r]), 4),
                             kl_proxy_base=round(float(diag["kl_proxy_base"][r]), 5))
            if row.logprobs is not None:
                top = logprobs[r].topk(min(row.logprobs, logprobs.shape[-1]))
                entry.update(logprob=float(logprobs[r, token]), token=generated_text(tokenizer, [token]),
                             top_logprobs=[(generated_text(tokenizer, [i]), v, i)
                                           for v, i in zip(top.values.tolist(), top.indices.tolist())])
            row.records.append(entry)

    def advance(self, tokens: torch.Tensor) -> int:
        """Every row that goes on takes its token (B,); how many were taken."""
        tokens = torch.where(self.active, tokens, torch.full_like(tokens, self.pad_id))
        if self.seq is not None:
            self.seq = torch.cat([self.seq, tokens[:, None]], dim=-1)
        self.last = tokens
        return sum(row.take([token]) for row, token in zip(self.rows, tokens.tolist()))

    # -- rows joining and leaving (a live batch) -----------------------------------------------------
    def join(self, rows: Sequence[Row]) -> None:
        """Rows that start below these; the others' last tokens have been fed already."""
        self.seq = self.batch_processors = self.last = None  # no longer one rectangle
        self.rows += list(rows)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (in this order)."""
        self.seq = self.batch_processors = None
        self.rows = [self.rows[r] for r in keep]
        if self.last is not None:
            self.last = self.last[keep] if keep else None

    def generations(self, prompts: Sequence, tokenizer) -> list[Generation]:
        return [row.generation(prompt, tokenizer) for prompt, row in zip(prompts, self.rows)]


def next_tokens(engine, rows: Rows, logits: dict) -> int:
    """One step: every row's next token from the streams' logits (stream key -> (B, V)); how many rows
    took one. The tokens to feed the models next are `rows.last`."""
    scores = engine.combine(logits, rows.alphas(engine.pairs))  # s_base + alpha * (s_expert - s_anti)
    tokens = rows.pick(rows.process(scores[:, None])[:, 0])  # transformers' processors; argmax or a sample
    if any(row.recording for row in rows.rows):
        rows.record(tokens, engine.view(engine.base_key, logits[engine.base_key]), scores, engine.tokenizer)
    return rows.advance(tokens)  # each row ends on a stop id, a stop string or its budget
