"""Answer extraction and scoring: SQuAD-style exact match over aliases, GSM8K numbers, MC1.

Pure functions of strings and numbers, so the eval stage and the tests need no model.
"""
from __future__ import annotations

import math
import re
import string
from typing import Callable, Iterable, Sequence

from core.errors import UserError
from proxy.text import cut_at_stop
from training.tasks import NUMBER, extract_gsm8k_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_list(answers: str | Iterable[str] | None) -> list[str]:
    if answers is None:
        return []
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized answer (alias), else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_list(answers)))


def parse_number(text: str | None) -> float | None:
    """'1,234.50', '$12', '-3' -> a float; None if the text holds no number."""
    if text is None:
        return None
    match = NUMBER.search(str(text))
    if match is None:
        return None
    cleaned = match.group(0).replace(",", "").replace("$", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def numbers_equal(a: str | float | None, b: str | float | None, tol: float = 1e-6) -> bool:
    x = a if isinstance(a, (int, float)) else parse_number(a)
    y = b if isinstance(b, (int, float)) else parse_number(b)
    return x is not None and y is not None and math.isclose(float(x), float(y), rel_tol=0, abs_tol=tol)


def gsm8k_accuracy(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 if the number extracted from the prediction equals a gold number (commas ignored)."""
    pred = extract_gsm8k_answer(prediction)
    return float(any(numbers_equal(pred, extract_gsm8k_answer(a) or a) for a in _as_list(answers)))


def mc1_choice(log_likelihoods: Sequence[float]) -> int:
    """The index of the most likely choice (the first one on ties)."""
    if len(log_likelihoods) == 0:
        raise ValueError("mc1_choice needs at least one choice")
    return max(range(len(log_likelihoods)), key=lambda i: (log_likelihoods[i], -i))


def mc1(log_likelihoods: Sequence[float], correct: int = 0) -> float:
    """TruthfulQA MC1: 1.0 if the correct choice has the highest log-likelihood."""
    return float(mc1_choice(log_likelihoods) == correct)


METRICS: dict[str, Callable[[str, str | Iterable[str]], float]] = {
    "exact_match": exact_match,
    "gsm8k_accuracy": gsm8k_accuracy,
}


def score(metric: str, prediction: str, answers: str | Iterable[str], stop: Sequence[str] = ()) -> float:
    """Score one generation with a task's metric, after cutting it at the task's stop strings."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; known: {', '.join(sorted(METRICS))}")
    return METRICS[metric](cut_at_stop(prediction, stop), answers)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
