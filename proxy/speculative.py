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
from transformers import (
    EosTokenCriteria,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from proxy.engine import GenerationSettings, ModelStream, ProxyEngine, left_pad, logits_processors
from proxy.errors import UserError

K_MAX = 8
LENGTH_FREE = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)  # read neither ids nor their length


def apply_processors(processors: LogitsProcessorList, scores: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Run transformers' processors on scores (N, V) whose rows sit at different sequence lengths (N,).

    The processors used here (min-new-tokens, temperature, top-k, top-p) read only the length of
    `input_ids`, so each group of rows at one length gets one call with placeholder ids."""
    if not processors:
        return scores
    if all(isinstance(p, LENGTH_FREE) for p in processors):
        return processors(scores.new_zeros((scores.shape[0], 1), dtype=torch.long), scores)
    out = torch.empty_like(scores)
    for width in widths.unique().tolist():
        rows = (widths == width).nonzero().flatten()
        ids = torch.zeros((len(rows), int(width)), dtype=torch.long, device=scores.device)
        out[rows] = processors(ids, scores[rows])
    return out


class DraftLength:
    """k fixed, or `auto`: the k that maximises expected tokens per unit of cost, from the measured
    acceptance probability and the measured cost of one draft forward relative to the rest of a round
    (the verify forwards and the acceptance bookkeeping)."""

    def __init__(self, k: int | str):
        self.auto = str(k) == "auto"
        self.k = 4 if self.auto else int(k)
        if not 1 <= self.k <= K_MAX:
            raise UserError(f"proxy.speculative.k must be between 1 and {K_MAX}, or auto; got {k}")
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
        # k and, for `auto`, what it has measured carry over from batch to batch and call to call
        self.draft_length = DraftLength(k)
        self._terminal_ids: dict[tuple[str, ...], torch.Tensor] = {}

    def terminal_ids(self, stop) -> torch.Tensor:
        """Tokens that end a row on their own: EOS, and every token whose text contains a stop string.

        Drafting stops once every row has drafted one: later drafts could never be kept. (Only an
        economy: whether a row has finished is still decided by the stopping criteria.)"""
        key = tuple(stop)
        if key not in self._terminal_ids:
            ids = [] if self.eos_id is None else [self.eos_id]
            if stop:
                texts = self.tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
                ids += [i for i, t in enumerate(texts) if any(s in t for s in stop)]
            self._terminal_ids[key] = torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.device)
        return self._terminal_ids[key]

    def _generate_batch(self, prompts, settings: GenerationSettings, diagnostics, generator, stats):
        if diagnostics:
            raise UserError("proxy.diagnostics is not available with speculative decoding; turn one off")
        streams, base_key, pair_keys = self._stream_plan()
        draft_key = pair_keys[0][0]
        encoded = {key: [self.encode(p, key[1]) for p in prompts] for key in streams}
        self._check_lengths(streams, encoded, prompts, settings.max_new_tokens + K_MAX + 1)
        runners = {key: ModelStream(model) for key, model in streams.items()}
        padded = {key: left_pad(encoded[key], self.pad_id) for key in streams}
        drafter = runners[draft_key]
        drafter_prompt_logits = drafter.prefill(*padded[draft_key])
        base_rows = encoded[base_key]
        prompt_width = padded[base_key][0].shape[1]
        batch = len(prompts)
        dev = self.device

        processors = logits_processors(settings, prompt_width, self.eos_id)
        stop_done = self.stop_criteria(settings.stop)
        eos_done = EosTokenCriteria(eos_token_id=self.eos_id) if self.eos_id is not None else None
        generated: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        finished = [False] * batch

        def commit(row: int, tokens: list[int]) -> None:
            """Append tokens to a row until one of the stopping criteria fires."""
            for tok in tokens:
                generated[row].append(tok)
                ids = torch.tensor([base_rows[row] + generated[row]], device=dev)
                for reason, crit in (("eos", eos_done), ("stop", stop_done)):
                    if crit is not None and bool(crit(ids, None)[0]):
                        finished[row], reasons[row] = True, reason
                        return
                if len(generated[row]) >= settings.max_new_tokens:
                    finished[row], reasons[row] = True, "length"
                    return

        def widths(offset: int, n: int) -> torch.Tensor:
            """Sequence length each row would have at n consecutive positions starting `offset` after its last token."""
            g = torch.tensor([prompt_width + len(r) for r in generated], device=dev)
            return (g[:, None] + offset + torch.arange(n, device=dev)).flatten()

        def warp(scores: torch.Tensor, offset: int) -> torch.Tensor:
            """Processors over (B, n, V) scores at positions offset.. offset+n-1 after each row's last token."""
            if not processors:  # greedy without constraints: nothing to apply, no widths to build
                return scores
            b, n, v = scores.shape
            return apply_processors(processors, scores.reshape(b * n, v), widths(offset, n)).reshape(b, n, v)

        def pick(scores: torch.Tensor) -> torch.Tensor:
            """Greedy or sampled tokens from warped scores (B, V)."""
            if settings.do_sample:
                return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
            return scores.argmax(-1)

        # The first round has no pending token: the expert drafts from the prompt, and the other models
        # read the prompt and the drafts in one forward (their prefill is the first verification).
        pending = None
        draft_len = self.draft_length
        terminal = self.terminal_ids(settings.stop)
        pad = torch.full((batch,), self.pad_id, dtype=torch.long, device=dev)
        while not all(finished):
            rows = [r for r in range(batch) if not finished[r]]
            active = torch.tensor([not f for f in finished], device=dev)
            budget = max(settings.max_new_tokens - len(generated[r]) for r in rows)
            lead = 0 if pending is None else 1  # tokens fed before the drafts: the pending one

            t0 = time.perf_counter()
            draft_logits, drafts = [], []
            ended = ~active  # rows for which no further draft could be kept
            lg = drafter_prompt_logits if pending is None else drafter.step(torch.where(active, pending, pad))
            for j in range(min(draft_len.k, budget)):
                if j:
                    lg = drafter.step(drafts[-1])
                draft_logits.append(lg)
                drafts.append(pick(warp(lg[:, None, : self.vocab_size].float(), j)[:, 0]))
                ended |= torch.isin(drafts[-1], terminal)
                if bool(ended.all()):
                    break
            k = len(drafts)
            t1 = time.perf_counter()
            drafted = torch.stack(drafts, 1)  # (B, k)
            if pending is None:
                verify = {key: r.prefill(torch.cat([padded[key][0], drafted], 1),
                                         torch.cat([padded[key][1], torch.ones_like(drafted)], 1), last=k + 1)
                          for key, r in runners.items() if key != draft_key}
            else:
                fed = torch.cat([pending[:, None], drafted], 1)  # (B, k+1)
                verify = {key: r.feed(fed) for key, r in runners.items() if key != draft_key}

            scores = self._combine_at(verify, draft_key, torch.stack(draft_logits, 1), base_key, pair_keys)
            p = warp(scores, 0)  # (B, k, V) proxy scores at the drafted positions
            if settings.do_sample:
                q = warp(torch.stack(draft_logits, 1)[..., : self.vocab_size].float(), 0)
                n_acc, fix = self._accept_sampled(p, q, drafted, generator)
            else:
                proxy_top = p.argmax(-1)
                n_acc = (proxy_top == drafted).long().cumprod(1).sum(1)  # (B,)
                fix = proxy_top.gather(1, n_acc.clamp_max(k - 1)[:, None]).squeeze(1)

            n_list = n_acc.tolist()
            before = {r: len(generated[r]) for r in rows}
            for r in rows:
                commit(r, drafted[r, : n_list[r]].tolist())
            drafter_fed = k - 1 + lead  # the pending token and the drafts but the last
            # a row that kept every draft and goes on takes a bonus token, which needs the expert's
            # logits after the last draft; a row that ended inside its drafts needs none
            all_in = (n_acc == k) & torch.tensor([not f for f in finished], device=dev)
            if all_in.any():
                bonus_expert = drafter.step(drafted[:, -1])
                drafter_fed += 1
                bonus_scores = self._combine_at(
                    {key: lg[:, k:] for key, lg in verify.items()}, draft_key, bonus_expert[:, None], base_key,
                    pair_keys,
                )
                fix = torch.where(all_in, pick(warp(bonus_scores, k)[:, 0]), fix)
            fix_list = fix.tolist()
            for r in rows:
                if not finished[r]:
                    commit(r, [fix_list[r]])
                stats.new_tokens += len(generated[r]) - before[r]
            keep = n_acc + lead
            for key, runner in runners.items():
                if key == draft_key:  # a finished row that kept every draft never fed the last one
                    runner.keep(drafter_fed, keep.clamp_max(drafter_fed))
                else:
                    runner.keep(k + lead, keep)
            pending = fix

            stats.steps += 1
            stats.row_forwards += len(rows)
            stats.drafted += k * len(rows)
            kept = sum(n_list[r] for r in rows)
            stats.accepted += kept
            draft_len.update(kept, k * len(rows), (t1 - t0) / k, time.perf_counter() - t1)

        for key, runner in runners.items():
            name = "base" if key == base_key else f"stream{list(runners).index(key)}"
            stats.per_model_forwards[name] = stats.per_model_forwards.get(name, 0) + runner.forwards
        return [self._finish(prompt, generated[row], reasons[row], settings.stop, None)
                for row, prompt in enumerate(prompts)]

    def _combine_at(self, verify: dict, draft_key, draft_logits: torch.Tensor, base_key, pair_keys) -> torch.Tensor:
        """Proxy scores (B, n, V) at the n positions the drafter's logits (B, n, V) cover."""
        n = draft_logits.shape[1]
        logits = {key: lg[:, :n] for key, lg in verify.items()}
        logits[draft_key] = draft_logits
        return self.combine(logits, base_key, pair_keys)

    @staticmethod
    def _accept_sampled(p_scores, q_scores, drafted, generator):
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
