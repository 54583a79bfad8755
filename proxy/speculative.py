"""Speculative proxy decoding: the expert drafts, the base and anti-expert verify, exactly.

Each round the expert (the first pair's) drafts k tokens, one forward each with its cache; every other
model then runs once over the pending token and the k drafts. The proxy scores at each drafted
position use the expert logits computed while drafting, so nothing is computed twice. Drafts are
accepted by the speculative-sampling rule against the proxy distribution (Leviathan et al. 2023;
Chen et al. 2023): greedy output is token for token the plain engine's, sampled output follows the
proxy distribution. Each row of a batch accepts its own number of drafts; rejected cache slots are
masked out (`ModelStream.keep`).
"""
from __future__ import annotations

import math
import time

import torch

from core.errors import UserError
from proxy.decoding import DecodeRules
from proxy.engine import DecodeStats, ProxyEngine
from proxy.step import Rows
from proxy.streams import AttentionLayout, open_stream

K_MAX = 8


class DraftLength:
    """k fixed, or `auto`: the k that maximises expected tokens per unit of cost, from the measured
    acceptance probability and the measured cost of one draft forward relative to the rest of a round
    (the verify forwards and the acceptance bookkeeping)."""

    def __init__(self, k: int | str):
        self.auto = str(k) == "auto"
        if not self.auto and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K_MAX):
            raise UserError(f"proxy.speculative.k must be a whole number between 1 and {K_MAX}, or auto; got {k!r}")
        self.k = 4 if self.auto else k
        self.accept = 0.6  # running per-draft acceptance probability
        self.draft_cost = 0.3  # running draft-forward time / time of the rest of a round

    def update(self, accepted: float, drafted: float, t_draft: float, t_rest: float) -> None:
        if not self.auto or drafted == 0:
            return
        self.accept = 0.7 * self.accept + 0.3 * min(accepted / drafted, 0.99)
        if t_rest > 0:
            self.draft_cost = 0.7 * self.draft_cost + 0.3 * (t_draft / t_rest)
        a, c = self.accept, self.draft_cost
        self.k = max(range(1, K_MAX + 1), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (k * c + 1))


class SpeculativeProxyEngine(ProxyEngine):
    """A ProxyEngine whose `generate` drafts with the first pair's expert. Same arguments, plus `k`."""

    def __init__(self, *args, k: int | str = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.pairs:
            raise UserError("speculative decoding drafts with an expert: give at least one expert")
        if self.parallel:
            raise UserError("proxy.parallel and proxy.speculative.k do not combine yet; choose one")
        if self.bridges:
            raise UserError("speculative decoding drafts in the base's own tokens, and this expert has a tokenizer of "
                            "another family (proxy.cross); drop proxy.speculative.k")
        for stream in self.streams.values():
            AttentionLayout(stream.model).check_rollback("speculative decoding (proxy.speculative.k)")
        # k and, for `auto`, what it has measured carry over from batch to batch and call to call
        self.draft_length = DraftLength(k)
        self._terminal_ids: dict[tuple[str, ...], torch.Tensor] = {}

    def terminal_ids(self, stop) -> torch.Tensor:
        """Tokens that end a row on their own: the stop ids, and every token whose text contains a stop string.

        Drafting stops once every row has drafted one: later drafts could never be kept. (Only an
        economy: whether a row has finished is still decided by the stopping rules.)"""
        key = tuple(stop)
        if key not in self._terminal_ids:
            ids = list(self.stop_ids)
            if stop:
                texts = self.tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
                ids += [i for i, t in enumerate(texts) if any(s in t for s in stop)]
            self._terminal_ids[key] = torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.device)
        return self._terminal_ids[key]

    def draft_margin(self, batch: int) -> int:
        # a row never drafts past its budget alone; beside others it may draft up to K_MAX past it (its
        # extra drafts are dropped), and those positions must exist too
        return K_MAX if batch > 1 else 0

    def decode_batch(self, padded: dict, rules: DecodeRules, stats: DecodeStats, diagnostics: bool = False) -> Rows:
        if diagnostics:
            raise UserError("proxy.diagnostics is not available with speculative decoding; turn one off")
        return SpeculativeBatch(self, padded, rules, stats).run()


class SpeculativeBatch:
    """One batch decoded in rounds: the expert drafts, the other models verify, each row keeps what the
    proxy would have produced and rolls back the rest."""

    def __init__(self, engine: SpeculativeProxyEngine, padded: dict, rules: DecodeRules, stats: DecodeStats):
        self.engine, self.padded, self.rules, self.stats = engine, padded, rules, stats
        self.draft_key = engine.pair_keys[0][0]
        self.shared = engine.pairs[0].shared
        self.runners = {key: open_stream(s.model) for key, s in engine.streams.items()}
        # rows advance by different numbers of tokens: no common rectangle of ids
        self.rows = Rows.batch(rules, *padded[engine.base_key], engine.pad_id, aligned=False)

    # -- the pieces of a round ----------------------------------------------------------------------
    def expert_view(self, logits: torch.Tensor) -> torch.Tensor:
        """The drafter's own scores over the shared vocabulary (a shared pair's expert half)."""
        if self.shared:
            logits = logits[..., : logits.shape[-1] // 2]
        return self.engine.view(self.draft_key, logits).to(self.engine.device)

    def combine_at(self, verify: dict, draft_logits: torch.Tensor) -> torch.Tensor:
        """Proxy scores (B, n, V) at the n positions the drafter's logits (B, n, V) cover."""
        n = draft_logits.shape[1]
        logits = {key: lg[:, :n] for key, lg in verify.items()}
        logits[self.draft_key] = draft_logits
        return self.engine.combine(logits)

    def draft(self, first_logits: torch.Tensor | None, pending: torch.Tensor | None):
        """Up to k drafts per row from the expert: (drafts (B, k), the expert's logits before each (B, k, V))."""
        drafter, rules, rows = self.runners[self.draft_key], self.rules, self.rows
        active = rows.active
        budget = max(rules.max_new_tokens - len(rows[r].generated) for r in rows.live())
        terminal = self.engine.terminal_ids(rules.stop_strings.stop)
        pad = torch.full_like(active, self.engine.pad_id, dtype=torch.long)
        ended = ~active  # rows for which no further draft could be kept
        lg = first_logits if pending is None else drafter.step(torch.where(active, pending, pad))
        logits, drafts = [], []
        for j in range(min(self.engine.draft_length.k, budget)):
            if j:
                lg = drafter.step(drafts[-1])
            logits.append(lg)
            before = torch.stack(drafts, 1) if drafts else None
            drafts.append(rows.pick(rows.process(self.expert_view(lg)[:, None], before, j)[:, 0]))
            ended |= torch.isin(drafts[-1], terminal)
            if bool(ended.all()):
                break
        return torch.stack(drafts, 1), torch.stack(logits, 1)

    def verify(self, drafted: torch.Tensor, pending: torch.Tensor | None) -> dict:
        """Every other model over the pending token and the drafts (the first round: the prompt and the drafts)."""
        if pending is None:
            return {key: r.prefill(torch.cat([self.padded[key][0], drafted.cpu()], 1),
                                   torch.cat([self.padded[key][1], torch.ones_like(drafted.cpu())], 1),
                                   last=drafted.shape[1] + 1)
                    for key, r in self.runners.items() if key != self.draft_key}
        fed = torch.cat([pending[:, None], drafted], 1)  # (B, k+1)
        return {key: r.feed(fed, self.rows.active) for key, r in self.runners.items() if key != self.draft_key}

    def accept(self, drafted, draft_logits, verify) -> tuple[torch.Tensor, torch.Tensor]:
        """How many drafts each row keeps (B,), and the proxy's token after them (B,)."""
        k = drafted.shape[1]
        p = self.rows.process(self.combine_at(verify, draft_logits), drafted, 0)  # (B, k, V)
        if self.rules.do_sample:
            q = self.rows.process(self.expert_view(draft_logits), drafted, 0)
            return accept_sampled(p, q, drafted, self.rules.generator)
        proxy_top = p.argmax(-1)
        n_acc = (proxy_top == drafted).long().cumprod(1).sum(1)
        return n_acc, proxy_top.gather(1, n_acc.clamp_max(k - 1)[:, None]).squeeze(1)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Rows:
        first = self.runners[self.draft_key].prefill(*self.padded[self.draft_key])
        pending = None  # the first round drafts from the prompt; its verification is the others' prefill
        while not self.rows.done:
            pending = self.round(first, pending)
        self.stats.count_forwards(self.runners, self.engine.base_key)
        return self.rows

    def round(self, first, pending):
        """Draft, verify, keep; returns the token each row takes next (pending for the next round)."""
        rows, stats, drafter = self.rows, self.stats, self.runners[self.draft_key]
        live = rows.live()
        lead = 0 if pending is None else 1  # tokens fed before the drafts: the pending one
        t0 = time.perf_counter()
        drafted, draft_logits = self.draft(first, pending)
        k = drafted.shape[1]
        t1 = time.perf_counter()
        verify = self.verify(drafted, pending)
        n_acc, fix = self.accept(drafted, draft_logits, verify)
        n_list = n_acc.tolist()
        taken = sum(rows[r].take(drafted[r, : n_list[r]].tolist()) for r in live)
        drafter_fed = k - 1 + lead  # the pending token and the drafts but the last
        # a row that kept every draft and goes on takes a bonus token, which needs the expert's
        # logits after the last draft; a row that ended inside its drafts needs none
        all_in = (n_acc == k) & rows.active
        if all_in.any():
            bonus = drafter.step(drafted[:, -1])
            drafter_fed += 1
            scores = self.combine_at({key: lg[:, k:] for key, lg in verify.items()}, bonus[:, None])
            fix = torch.where(all_in, rows.pick(rows.process(scores, drafted, k)[:, 0]), fix)
        fix_list = fix.tolist()
        taken += sum(rows[r].take([fix_list[r]]) for r in live)
        keep = n_acc + lead
        for key, runner in self.runners.items():
            if key == self.draft_key:  # a finished row that kept every draft never fed the last one
                runner.keep(drafter_fed, keep.clamp_max(drafter_fed))
            else:
                runner.keep(k + lead, keep)
        kept = sum(n_list[r] for r in live)
        stats.new_tokens += taken
        stats.steps += 1
        stats.row_forwards += len(live)
        stats.drafted += k * len(live)
        stats.accepted += kept
        self.engine.draft_length.update(kept, k * len(live), (t1 - t0) / k, time.perf_counter() - t1)
        return fix


def accept_sampled(p_scores, q_scores, drafted, generator):
    """Speculative sampling: accept draft j with probability min(1, p/q); at the first rejection,
    resample from max(0, p - q) renormalised. Returns (accepted count (B,), the token after them (B,))."""
    p = torch.softmax(p_scores, -1)
    q = torch.softmax(q_scores, -1)
    b, k, _ = p.shape
    p_d = p.gather(-1, drafted[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafted[..., None]).squeeze(-1)
    u = torch.rand((b, k), generator=generator, device=p.device)
    ok = u * q_d < p_d  # u < p/q without dividing by a zero q
    n_acc = ok.long().cumprod(1).sum(1)
    at = n_acc.clamp_max(k - 1)
    residual = (p[torch.arange(b), at] - q[torch.arange(b), at]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # where p == q at that position the residual is empty; p itself is then the right law
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[torch.arange(b), at])
    fix = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return n_acc, fix


def expected_speedup(accept: float, k: int, r: float, verify_cost: float) -> float:
    """Cost model: speed of speculative proxy decoding over the base alone.

    accept: per-draft acceptance probability; k: draft length; r: one base forward's time over one
    expert forward's; verify_cost: one base forward over k+1 tokens relative to a 1-token forward
    (the anti-expert's verify costs verify_cost / r). Tokens per round: (1 - a^(k+1)) / (1 - a).
    Time per round, in base-forward units: k/r (drafts) + verify_cost * (1 + 1/r) (base + anti-expert).
    """
    tokens = (1 - accept ** (k + 1)) / (1 - accept) if accept < 1 else k + 1
    cost = k / r + verify_cost * (1 + 1 / r)
    return tokens / cost if cost > 0 and math.isfinite(cost) else float("nan")
