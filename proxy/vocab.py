"""The vocabulary that a base, its experts and anti-expert share, and tokenizer fingerprints."""
from __future__ import annotations

import hashlib
import json
from typing import Mapping

from proxy.errors import UserError


def id_to_token(tokenizer) -> list[str]:
    """Token strings by id over the tokenizer's real vocabulary (added tokens included)."""
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the id -> token table and the special tokens: equal fingerprints, same tokenization."""
    table = {"tokens": id_to_token(tokenizer), "special": tokenizer.special_tokens_map}
    digest = hashlib.sha256(json.dumps(table, sort_keys=True, default=str).encode()).hexdigest()
    return f"sha256:{digest[:16]}"


def shared_vocab_size(tokenizers: Mapping[str, object], logit_widths: Mapping[str, int] | None = None) -> int:
    """The number of leading token ids on which every tokenizer agrees, or a UserError naming the
    first token that differs.

    A tuned model with one extra pad token, or a model whose embedding matrix is padded past its
    tokenizer (Qwen-style), still shares the base's range; logits are cut to it before combining.
    `tokenizers` maps a role (e.g. "base", "expert 'path'") to its tokenizer; the first is the reference.
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
                    f"{other[i]!r} there and {ref[i]!r} in the {ref_role}; proxy-tuning needs models "
                    "that share one tokenizer (use an expert tuned from a model of the base's family)"
                )
    eos = {role: tokenizers[role].eos_token_id for role in roles}
    if len(set(eos.values())) > 1:
        raise UserError(f"the models disagree on the end-of-sequence token id: {eos}")
    for role, width in (logit_widths or {}).items():
        if width < size:
            raise UserError(
                f"{role} outputs {width} logits but its tokenizer has {size} tokens; the checkpoint is broken"
            )
    return size
