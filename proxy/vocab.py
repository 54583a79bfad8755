"""The vocabulary that a base, its experts and anti-experts share, and the ids each of them ends on."""
from __future__ import annotations

from typing import Iterable, Mapping

from core.errors import UserError
from core.vocabulary import id_to_token

SAME_FAMILY = "proxy-tuning needs models that share one tokenizer (use an expert tuned from a model of the base's family)"


def shared_vocab_size(tokenizers: Mapping[str, object], logit_widths: Mapping[str, int] | None = None,
                      advice: str = SAME_FAMILY) -> int:
    """The number of leading token ids on which every tokenizer agrees, or a UserError naming the
    first token that differs.

    Tokenizers may differ past that range (a tuned model's added pad or chat tokens), in the padding of
    their embedding matrix (Qwen-style), and in which token ends a sequence (a base and its instruct
    model); logits are cut to the shared range before combining.
    `tokenizers` maps a role (e.g. "base", "expert 'path'") to its tokenizer; the first is the reference.
    `advice`: what the message tells the user to do.
    """
    roles = list(tokenizers)
    tables = {role: id_to_token(tokenizers[role]) for role in roles}
    ref_role = roles[0]
    ref = tables[ref_role]
    size = min(len(t) for t in tables.values())
    for role in roles[1:]:
        other = tables[role]
        for i in range(size):
            if ref[i] != other[i]:
                raise UserError(
                    f"the tokenizer of {role} does not match the {ref_role}'s: token id {i} is "
                    f"{other[i]!r} there and {ref[i]!r} in the {ref_role}; {advice}"
                )
    for role, width in (logit_widths or {}).items():
        if width < size:
            raise UserError(
                f"{role} outputs {width} logits but its tokenizer has {size} tokens; the checkpoint is broken"
            )
    return size


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def end_ids(model, tokenizer) -> list[int]:
    """The ids a model ends on: its tokenizer's EOS and every id its generation config stops at
    (Llama-3-Instruct: <|eot_id|> and <|eom_id|>; Gemma-2-it: <end_of_turn>; Qwen-Instruct: <|im_end|>)."""
    gen = getattr(model, "generation_config", None)
    ids = _ids(getattr(gen, "eos_token_id", None)) + _ids(tokenizer.eos_token_id)
    return sorted(set(ids))


def stop_set(ends: Iterable[Iterable[int]], vocab_size: int) -> list[int]:
    """Every id that any model in the run ends on, within the shared vocabulary."""
    return sorted({i for model_ends in ends for i in model_ends if 0 <= i < vocab_size})
