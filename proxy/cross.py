"""An expert and anti-expert of another tokenizer family steering the base: their offset carried over
through the text the base's tokens spell (docs/cross-tokenizer.md).

At each step, for the base's candidate tokens c (its top `candidates`, the base tokens the expert's top
`candidates` begin, and the base's end ids), each small model m scores the text c would add after the
word still open (`pending`), written in the small tokenizer's own tokens (proxy.bridge):

    S_m(c) = log sum over the open word's cuts of P_m(the ids before the cut) * P_m(one small token that
             writes the rest, or runs on past c's end where the base has no longer token)
    offset(c) = log softmax_C S_expert(c) - log softmax_C S_anti(c)       0 outside C

and the proxy is s_base + alpha * offset, as the same-tokenizer engine's s_base + alpha * (s_expert - s_anti).
The candidates' spellings are scored in one forward per small model (a tree of branches over its cache,
proxy.streams.ModelStream.branches). When c is picked, the small models read the words it completes;
the word it leaves open is spelt again with the next token. For a pair of the base's own tokenizer every
spelling is the base's own id and nothing is held back, so C covering the vocabulary gives the
same-tokenizer engine's tokens.
"""
from __future__ import annotations

import math

import torch

from proxy.bridge import END, Bridge
from proxy.streams import ModelStream, open_stream


class CrossPair:
    """The small pair's two streams (expert, anti-expert) reading the base's text, row by row."""

    def __init__(self, bridge: Bridge, expert, anti, candidates: int):
        self.bridge, self.candidates = bridge, int(candidates)
        self.streams: list[ModelStream] = [open_stream(expert), open_stream(anti)]
        self.logp: list[torch.Tensor] = []  # per stream (B, V_small): the next small token's log-probabilities
        self.pending: list[bytes] = []  # per row: bytes of the text not yet read by the small models
        self.read: list[list[int]] = []  # per row: the small ids read after the prompt
        self.skipped: list[list[bytes]] = []  # per row: text the small vocabulary cannot write (left unread)

    @property
    def forwards(self) -> int:
        return sum(s.forwards for s in self.streams)

    def prefill(self, expert: tuple[torch.Tensor, torch.Tensor], anti: tuple[torch.Tensor, torch.Tensor]) -> "CrossPair":
        self.logp = [torch.log_softmax(s.prefill(*p).float(), -1) for s, p in zip(self.streams, (expert, anti))]
        self.pending = [b""] * len(expert[0])
        self.read = [[] for _ in self.pending]
        self.skipped = [[] for _ in self.pending]
        return self

    # -- the offset ---------------------------------------------------------------------------------
    def offset(self, base: torch.Tensor) -> torch.Tensor:
        """log q_expert(c) - log q_anti(c) over each row's candidates C (0 elsewhere): (B, V_base)."""
        out = torch.zeros(base.shape, dtype=torch.float32)
        k = min(self.candidates, base.shape[-1])
        base_top = base.topk(k, dim=-1).indices.tolist()
        expert_top = self.logp[0].topk(min(k, self.logp[0].shape[-1]), dim=-1).indices.tolist()
        bridge = self.bridge
        spelt = []  # per row: [(base id, ids, [(where the open word's i-th cut falls in ids, its cover)])]
        for r, pending in enumerate(self.pending):
            if k >= base.shape[-1]:
                wanted = set(range(base.shape[-1]))
            else:  # the expert's proposals, at most 4k of them (the base's likeliest), bound the tree
                proposed = sorted(bridge.proposals(pending, expert_top[r]), key=lambda c: -float(base[r, c]))
                wanted = set(base_top[r]) | set(proposed[: 4 * k]) | set(bridge.base_stops)
            row = []
            for c in sorted(wanted):
                plan = bridge.candidate(pending, c)
                if plan is not None:
                    ids, _, cuts = plan
                    row.append((c, ids, cuts))
            spelt.append(row)
        scores = self._scores(spelt)
        for r, row in enumerate(spelt):
            finite = [j for j in range(len(row)) if all(math.isfinite(s[r][j]) for s in scores)]
            if len(finite) < 2:
                continue  # nothing to choose between: no steering
            ids = torch.tensor([row[j][0] for j in finite])
            expert, anti = (torch.log_softmax(torch.tensor([s[r][j] for j in finite]), -1) for s in scores)
            out[r, ids] = expert - anti
        return out.to(base.device)

    def _scores(self, spelt: list[list]) -> list[list[list[float]]]:
        """Each model's log-probability of each candidate's text: sum over the cuts of the open word of
        P(the ids before the cut) * P(one token of the cut's cover)."""
        # the tree: one node per distinct proper prefix of a spelling, shared by the candidates that have it
        nodes: list[dict[tuple, int]] = []
        for row in spelt:
            index: dict[tuple, int] = {}
            for _, ids, _ in row:
                for n in range(1, len(ids)):
                    index.setdefault(ids[:n], len(index))
            nodes.append(index)
        width = max((len(ix) for ix in nodes), default=0)
        branch = [None] * len(self.streams)
        if width:
            b = len(spelt)
            tokens = torch.zeros(b, width, dtype=torch.long)
            parents = torch.full((b, width), -1, dtype=torch.long)
            valid = torch.zeros(b, width, dtype=torch.bool)
            for r, index in enumerate(nodes):
                for prefix, i in index.items():
                    tokens[r, i] = prefix[-1]
                    parents[r, i] = index[prefix[:-1]] if len(prefix) > 1 else -1
                    valid[r, i] = True
            branch = [s.branches(tokens, parents, valid).float() for s in self.streams]
        # every log-probability the scores read, gathered at once: (row, node, token); node 0 is the text itself
        where, covers, spans = [], [], []
        for r, row in enumerate(spelt):
            for _, ids, cuts in row:
                node = [0] + [1 + nodes[r][ids[:n]] for n in range(1, len(ids))]
                first = len(where)
                where += [(r, node[n], t) for n, t in enumerate(ids) if t != END]
                spans.append((first, [(n, len(covers) + j) for j, (n, _) in enumerate(cuts)]))
                covers += [(r, node[n], cover) for n, cover in cuts]
        out = []
        for m in range(len(self.streams)):
            # log-probabilities: the text's are normalised already, a branch node's by its logsumexp, once per node
            table = self.logp[m][:, None] if branch[m] is None else torch.cat([self.logp[m][:, None], branch[m]], 1)
            zeros = torch.zeros(table.shape[0], 1, device=table.device)
            norm = zeros if branch[m] is None else torch.cat([zeros, torch.logsumexp(branch[m], -1)], 1)

            def logp(entries):
                rows, nodes, ids = ([e[i] for e in entries] for i in range(3))
                return table[rows, nodes, ids] - norm[rows, nodes]

            picked = logp(where).tolist() if where else []
            width = table.shape[-1]  # an expert's added tokens (its end of turn) lie past its anti-expert's logits
            flat = [(r, node, t) for r, node, cover in covers for t in cover if t < width]
            seg = torch.tensor([i for i, (_, _, cover) in enumerate(covers) for t in cover if t < width],
                               dtype=torch.long, device=table.device)
            values = logp(flat) if flat else torch.zeros(0, device=table.device)
            lse = segment_logsumexp(values, seg, len(covers)).tolist()
            scores, j = [[] for _ in spelt], 0
            for r, row in enumerate(spelt):
                for _, ids, _ in row:
                    first, cuts = spans[j]
                    j += 1
                    pieces = picked[first : first + sum(t != END for t in ids)]
                    terms = [sum(pieces[:n]) + lse[ci] for n, ci in cuts]
                    top = max(terms)
                    scores[r].append(top + math.log(sum(math.exp(t - top) for t in terms)) if top > -math.inf else top)
            out.append(scores)
        return out

    # -- reading the base's tokens ----------------------------------------------------------------
    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> "CrossPair":
        """The small models read each row's new base token (B,): the words it completes; the word it leaves
        open waits in `pending`. Rows that ended read nothing."""
        reads = []
        for r, c in enumerate(tokens.tolist()):
            if (active is not None and not bool(active[r])) or c in self.bridge.base_stops:
                reads.append(())
                continue
            pending = self.pending[r]
            plan = self.bridge.spelling(pending, c)  # its words' spellings are cached by the bridge
            data = self.bridge.base.bytes[c]
            if plan is None:  # a special token, or text the small vocabulary cannot write
                head = self.bridge.spell_text(pending) if pending and data is not None else None
                reads.append(head[0] if head else ())  # the word held back is read, c's text left unread
                if data is not None:
                    self.skipped[r].append(data if head else pending + data)
                    self.pending[r] = b""
                continue
            ids, word = plan
            held = len(self.bridge.small.spell(word) or ()) if word else 0
            reads.append(ids[: len(ids) - held])
            self.pending[r] = word
        for r, ids in enumerate(reads):
            self.read[r] += ids
        self._read(reads)
        return self

    def _read(self, reads: list[tuple[int, ...]]) -> None:
        width = max((len(r) for r in reads), default=0)
        if width == 0:
            return
        ids = torch.zeros(len(reads), width, dtype=torch.long)
        for r, read in enumerate(reads):
            ids[r, : len(read)] = torch.tensor(read, dtype=torch.long)
        counts = torch.tensor([len(r) for r in reads])
        moved = counts > 0
        for m, stream in enumerate(self.streams):
            logits = stream.feed(ids)
            stream.keep(width, counts)
            last = logits[torch.arange(len(reads)), (counts - 1).clamp_min(0)].float()
            self.logp[m] = torch.where(moved[:, None].to(last.device), torch.log_softmax(last, -1), self.logp[m])

    # -- rows joining and leaving a running batch ---------------------------------------------------
    def join(self, other: "CrossPair") -> None:
        for mine, theirs in zip(self.streams, other.streams):
            mine.join(theirs)
        self.logp = [torch.cat([a, b]) for a, b in zip(self.logp, other.logp)] if self.logp else other.logp
        self.pending += other.pending
        self.read += other.read
        self.skipped += other.skipped

    def select(self, keep: list[int]) -> None:
        for stream in self.streams:
            stream.select(keep)
        self.logp = [lp[keep] for lp in self.logp]
        self.pending = [self.pending[r] for r in keep]
        self.read = [self.read[r] for r in keep]
        self.skipped = [self.skipped[r] for r in keep]


def segment_logsumexp(values: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """logsumexp of `values` (M,) within each of n segments (`segments` (M,): each value's); -inf where empty."""
    values = values.float()
    top = torch.full((n,), -math.inf, device=values.device).scatter_reduce(0, segments, values, "amax")
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(n, device=values.device).index_add_(0, segments, (values - shift[segments]).exp())
    return shift + total.log()
