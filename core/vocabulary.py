"""A tokenizer's vocabulary as a table, and its fingerprint (what a registry card records)."""
from __future__ import annotations

import hashlib
import json


def id_to_token(tokenizer) -> list[str]:
    """Token strings by id over the tokenizer's real vocabulary (added tokens included)."""
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the id -> token table and the special tokens: equal fingerprints, same tokenization."""
    table = {"tokens": id_to_token(tokenizer), "special": tokenizer.special_tokens_map}
    digest = hashlib.sha256(json.dumps(table, sort_keys=True, default=str).encode()).hexdigest()
    return f"sha256:{digest[:16]}"
