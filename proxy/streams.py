"""One model reading one rendering of a batch of prompts, with its own KV cache.

Rows are left-padded and each carries explicit position ids, so a row's tokens see exactly what they
would see alone. Two things make that hold beyond plain causal attention:

- Rolled-back slots (speculative decoding keeps a different number of drafts per row) stay in the
  cache as holes, hidden by the attention mask.
- Sliding-window layers (Mistral, Gemma-2, Qwen2 with `use_sliding_window`) count their window in
  cache slots in transformers, which padding and holes would shift. Here every layer keeps its whole
  past (a plain `DynamicLayer`, so a roll-back never meets a trimmed window), and while a stream has
  padding or holes it gets its own 4-D masks whose window is counted in positions: token q sees key k
  when k is real, pos(k) <= pos(q) and pos(q) - pos(k) < window, which is what a lone row sees.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from core.errors import UserError

SUPPORTED_LAYERS = {"full_attention", "sliding_attention"}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, rows aligned on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded mask: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def cache_argument(model) -> str:
    """The name under which a model's forward takes its KV cache: `cache` where transformers has renamed it
    (5.25 here, where `past_key_values` warns and is to go in 5.40), `past_key_values` in older releases and
    in remote code that kept it. A PEFT model hands the cache on to its base model, whose name counts."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(inner, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def model_device(model) -> torch.device:
    """The device of the input embeddings, where input ids must go (a served base's scores arrive on the CPU)."""
    if getattr(model, "remote", False):
        return model.device
    return model.get_input_embeddings().weight.device


def logit_width(model) -> int:
    """How many logits a model gives per position (a served base: its tokenizer's vocabulary)."""
    if getattr(model, "remote", False):
        return model.vocab_size
    return model.get_output_embeddings().weight.shape[0]


def open_stream(model) -> "ModelStream":
    """A model reading a batch with its own KV cache; a served base (proxy.remote) brings its own kind."""
    return model.open_stream() if hasattr(model, "open_stream") else ModelStream(model)


class AttentionLayout:
    """Which attention each layer of a model uses, read the way transformers' caches read it."""

    def __init__(self, model):
        config = model.config.get_text_config(decoder=True)
        try:
            types, kwargs = get_layer_types_and_kwargs(config)
        except (AttributeError, TypeError):  # a remote-code config transformers cannot read
            types, kwargs = ["full_attention"], [{}]
        self.types = sorted(set(types))
        windows = {kw.get("sliding_window") for t, kw in zip(types, kwargs) if t == "sliding_attention"}
        self.window = min(windows) if windows else None
        self.supported = set(types) <= SUPPORTED_LAYERS
        # models with several attention kinds read a {layer type: mask} dict (Gemma-2, Qwen2)
        self.mixed = len(set(types)) > 1

    def check_rollback(self, what: str) -> None:
        if not self.supported:
            raise UserError(f"{what} needs a cache that can be rolled back; this model's layers are "
                            f"{', '.join(self.types)} (supported: {', '.join(sorted(SUPPORTED_LAYERS))})")


class ModelStream:
    """One model reading one rendering of the prompts, with its own KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = model_device(model)
        self.layout = AttentionLayout(model)
        self.cache_argument = cache_argument(model)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, S) 1 for a real slot of the cache, 0 for padding or a hole
        self.pos: torch.Tensor | None = None  # (B, S) position of each slot
        self.next_pos: torch.Tensor | None = None  # (B, 1)
        self.dense = False  # no padding and no holes: the model's own causal mask is the right one
        self.forwards = 0

    def _new_cache(self):
        # full layers everywhere: a sliding layer trims its past, which neither padding nor a roll-back survives
        if self.layout.supported:
            return DynamicCache()
        return DynamicCache(config=self.model.config)

    def _attention(self, query_pos: torch.Tensor):
        """What the model gets as attention_mask for queries at positions (B, n) over every slot."""
        if self.dense:
            return None  # spares building a mask per forward
        if self.layout.window is None or not self.layout.supported:
            return self.mask
        real = self.mask.bool()[:, None, :]  # (B, 1, S)
        past = self.pos[:, None, :] <= query_pos[:, :, None]  # (B, n, S)
        return self._masks(real & past, query_pos, self.pos)

    def _masks(self, allowed: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor):
        """The attention_mask for queries (B, n) over keys (B, S) that `allowed` (B, n, S) lets them see:
        4-D additive masks, the window of sliding layers counted in positions."""
        dtype = self.model.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32

        def additive(seen):
            return torch.zeros(seen.shape, dtype=dtype, device=self.device).masked_fill(
                ~seen, torch.finfo(dtype).min)[:, None]  # (B, 1, n, S)

        if self.layout.window is None:
            return additive(allowed)
        sliding = allowed & (query_pos[:, :, None] - key_pos[:, None, :] < self.layout.window)
        if self.layout.mixed:
            return {"full_attention": additive(allowed), "sliding_attention": additive(sliding)}
        return additive(sliding)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, logits_to_keep: int = 0):
        out = self.model(
            input_ids=ids,
            attention_mask=self._attention(positions),
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: self.cache},
            logits_to_keep=logits_to_keep,
        )
        self.forwards += 1
        return out.logits

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, last: int = 1) -> torch.Tensor:
        """Run the prompts; return the last position's logits (B, V), or the last `last` positions' (B, last, V)."""
        self.cache = self._new_cache()
        self.mask = mask.to(self.device)
        self.pos = positions_from_mask(self.mask)
        self.dense = bool(self.mask.all())
        logits = self._forward(ids.to(self.device), self.pos, logits_to_keep=last)
        self.next_pos = self.mask.sum(-1, keepdim=True)
        return logits[:, -1] if last == 1 else logits[:, -last:]

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Feed n new tokens per row (B, n) at the next logical positions; return their logits (B, n, V).
        (`active`: the rows that go on; the batch runs as one forward anyway.)"""
        tokens = tokens.to(self.device)
        n = tokens.shape[1]
        positions = self.next_pos + torch.arange(n, device=self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1]).expand(-1, n)], dim=-1)
        self.pos = torch.cat([self.pos, positions], dim=-1)
        logits = self._forward(tokens, positions)
        self.next_pos = self.next_pos + n
        return logits

    @torch.inference_mode()
    def branches(self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V) after each node of a tree of tokens (B, N) that grows from each row's text:
        node i follows the row's slots and its ancestors (parents[r, i]: the node it follows, -1 for the text
        itself). One forward for every branch; the cache is left as it was. `valid` (B, N): real nodes."""
        b, n = tokens.shape
        tokens, parents, valid = tokens.to(self.device), parents.to(self.device), valid.to(self.device)
        seen = torch.eye(n, dtype=torch.bool, device=self.device).expand(b, n, n).clone()
        depth = torch.zeros(b, n, dtype=torch.long, device=self.device)
        at = parents.clone()
        rows = torch.arange(b, device=self.device)[:, None].expand(b, n)
        cols = torch.arange(n, device=self.device)[None, :].expand(b, n)
        for _ in range(n):  # walk every node up to the text, marking its ancestors
            up = at >= 0
            if not up.any():
                break
            seen[rows[up], cols[up], at[up]] = True
            depth += up.long()
            at = torch.where(up, parents.gather(1, at.clamp_min(0)), at)
        positions = self.next_pos + depth
        length = self.mask.shape[1]
        text = self.mask.bool()[:, None, :].expand(b, n, length) & valid[:, :, None]
        allowed = torch.cat([text, seen & valid[:, None, :]], dim=-1)
        key_pos = torch.cat([self.pos, positions], dim=-1)
        out = self.model(input_ids=tokens, attention_mask=self._masks(allowed, positions, key_pos),
                         position_ids=positions, use_cache=True, **{self.cache_argument: self.cache})
        self.forwards += 1
        self.cache.crop(-n)  # the branches leave the cache
        return out.logits

    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one new token per row (B,); return the next logits (B, V)."""
        return self.feed(tokens[:, None])[:, -1]

    @torch.inference_mode()
    def keep(self, fed: int, valid: torch.Tensor) -> None:
        """Of the last `fed` slots, keep the first `valid[r]` of each row (B,) and roll back the rest.

        Rows keep different numbers, so a rejected slot stays in the cache masked out (a hole the
        attention mask hides); the tail that no row keeps is cropped from the cache."""
        if fed == 0:
            return
        valid = valid.to(self.device)
        keep = torch.arange(fed, device=self.device)[None, :] < valid[:, None]
        self.mask[:, -fed:] = keep.to(self.mask.dtype)
        self.next_pos = self.next_pos - fed + valid[:, None]
        drop = fed - int(valid.max())
        if drop > 0:
            self.cache.crop(-drop)
            self.mask = self.mask[:, :-drop]
            self.pos = self.pos[:, :-drop]
        self.dense = self.dense and bool(self.mask.all())

    # -- rows joining and leaving a running batch (continuous batching) ---------------------------------
    @torch.inference_mode()
    def join(self, other: "ModelStream") -> None:
        """Append the rows of another stream of the same model (its own prefill) below these.

        The caches are aligned on the right: the shorter side gets masked slots on the left, so every
        row keeps its own positions and sees exactly what it saw alone."""
        if self.cache is None:
            self.cache, self.mask, self.pos, self.next_pos = other.cache, other.mask, other.pos, other.next_pos
            self.dense = other.dense
            return
        self.layout.check_rollback("joining a running batch")
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        copies = getattr(self.model, "batch_copies", 1)  # a shared LoRA pair caches [expert rows | anti rows]

        def stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            parts = [p for pair in zip(left(a, -2).chunk(copies), left(b, -2).chunk(copies)) for p in pair]
            return torch.cat(parts, dim=0)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys, mine.values = stack(mine.keys, theirs.keys), stack(mine.values, theirs.values)
        self.mask = torch.cat([left(self.mask, 1), left(other.mask, 1)], dim=0)
        self.pos = torch.cat([left(self.pos, 1), left(other.pos, 1)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos], dim=0)
        self.dense = self.dense and other.dense and bool(self.mask.all())

    @torch.inference_mode()
    def select(self, rows: list[int]) -> None:
        """Keep only these rows (finished or cancelled ones leave); drop the slots no row uses any more."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        copies, batch = getattr(self.model, "batch_copies", 1), self.mask.shape[0]
        self.cache.batch_select_indices(torch.cat([index + c * batch for c in range(copies)]))
        self.mask, self.pos, self.next_pos = self.mask[index], self.pos[index], self.next_pos[index]
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask, self.pos = self.mask[:, first:], self.pos[:, first:]
        self.dense = bool(self.mask.all())
