"""Generated ids to text, and stop strings: one place for the engine, the evaluation and lm-eval.

The text of generated ids is what transformers' text-generation pipeline returns for them (the new
tokens decoded alone, special tokens skipped). A stop string ends a row as soon as the text of its new
tokens contains it, whatever the tokenizer (transformers' `StopStringCriteria` needs a BPE-like
vocabulary and refuses word-level ones), and the text is cut where the first stop string starts.
"""
from __future__ import annotations

from typing import Sequence


def generated_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ids, as the text-generation pipeline decodes them."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def final_text(tokenizer, ids: Sequence[int], reason: str | None, stop: Sequence[str] = ()) -> str:
    """The text of a row that ended for `reason`: the pipeline's text, cut where a stop string starts."""
    text = generated_text(tokenizer, ids)
    return cut_at_stop(text, stop) if reason == "stop" else text


def cut_at_stop(text: str, stop: Sequence[str] | str = ()) -> str:
    """The text before the first stop string (a bare string is one stop string)."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    found = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return text[: min(found)] if found else text


class StopStrings:
    """Tells whether the text of a row's new tokens holds a stop string.

    Checked after every token, so only a tail of the ids needs decoding: one long enough to hold the
    longest stop string even when some tokens decode to nothing (special tokens, partial bytes)."""

    def __init__(self, tokenizer, stop: Sequence[str] | str = ()):
        self.tokenizer = tokenizer
        self.stop = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
        self.tail = 2 * max((len(s) for s in self.stop), default=0) + 8

    def __bool__(self) -> bool:
        return bool(self.stop)

    def hit(self, new_ids: Sequence[int]) -> bool:
        if not self.stop or not new_ids:
            return False
        text = self.tokenizer.decode(list(new_ids[-self.tail:]), skip_special_tokens=True)
        return any(s in text for s in self.stop)
