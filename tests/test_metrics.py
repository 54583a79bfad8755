"""Answer extraction and scoring, exactly."""
from __future__ import annotations

import pytest

from core.errors import UserError
from eval.metrics import (
    cut_at_stop,
    exact_match,
    extract_gsm8k_answer,
    gsm8k_accuracy,
    mc1,
    mc1_choice,
    normalize_answer,
    numbers_equal,
    score,
)


def test_squad_normalization():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"


@pytest.mark.parametrize("pred, answers, expected", [
    ("Paris", ["paris", "city of light"], 1.0),
    ("the City of Light.", ["Paris", "City of Light"], 1.0),
    ("Paris, Texas", ["paris"], 0.0),
    ("William Shakespeare", "william shakespeare", 1.0),
    ("", ["x"], 0.0),
])
def test_exact_match_over_aliases(pred, answers, expected):
    assert exact_match(pred, answers) == expected


@pytest.mark.parametrize("text, number", [
    ("48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,550", "1550"),
    ("#### -2", "-2"),
    ("so it costs $1,234.50 in total.", "1234.50"),
    ("first 3 then 7.", "7"),
    ("no number here", None),
])
def test_gsm8k_extraction(text, number):
    assert extract_gsm8k_answer(text) == number


def test_gsm8k_accuracy_compares_numbers():
    assert gsm8k_accuracy("The answer is 1,000.", ["1000"]) == 1.0
    assert gsm8k_accuracy("#### 1000.0", "#### 1,000") == 1.0
    assert gsm8k_accuracy("#### 999", ["1000"]) == 0.0
    assert numbers_equal("2.25", 2.25) and not numbers_equal(None, 1)


def test_mc1_picks_the_argmax():
    assert mc1_choice([-3.0, -1.0, -2.0]) == 1
    assert mc1_choice([-1.0, -1.0]) == 0  # ties go to the first choice
    assert mc1([-0.5, -4.0], correct=0) == 1.0 and mc1([-5.0, -4.0], correct=0) == 0.0
    with pytest.raises(ValueError):
        mc1_choice([])


def test_score_cuts_at_stop_strings_and_rejects_unknown_metrics():
    assert cut_at_stop(" Paris\nQuestion: x", ["\n"]) == " Paris"
    assert score("exact_match", " Paris\nQuestion: what", ["paris"], stop=["\n"]) == 1.0
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        score("bleu", "x", ["x"])
