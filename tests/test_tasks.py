"""Tasks turn records in each dataset's own schema into training and eval examples."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import UserError
from eval.metrics import score
from training.tasks import (
    examples,
    fill,
    get_field,
    load_records,
    load_task,
    task_names,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_task(name, file=None, **overrides):
    return load_task(name, data_files=str(FIXTURES / f"{file or name}.jsonl"), **overrides)


def test_every_shipped_task_is_listed():
    assert {"triviaqa", "gsm8k", "ultrafeedback", "jsonl"} <= set(task_names())


def test_triviaqa_prompt_completion_and_aliases():
    task = fixture_task("triviaqa")
    sft = examples(task, "sft")
    assert sft[0] == {"prompt": "Question: Which city is the capital of France?\nAnswer:", "completion": " Paris"}
    ev = examples(task, "eval")
    assert "paris" in ev[0]["answers"] and "City of Light" in ev[0]["answers"]
    assert score(task.metric, " the City of Light!\nQuestion: next", ev[0]["answers"], stop=task.stop) == 1.0
    assert score(task.metric, " Lyon", ev[0]["answers"], stop=task.stop) == 0.0
    assert load_task("triviaqa").dataset == "mandarjoshi/trivia_qa" and load_task("triviaqa").config == "rc.nocontext"


def test_gsm8k_gold_is_the_number_after_hashes():
    task = fixture_task("gsm8k")
    sft = examples(task, "sft")
    assert sft[0]["prompt"].startswith("Question: Natalia") and sft[0]["completion"].endswith("#### 72")
    golds = [e["answers"] for e in examples(task, "eval")]
    assert golds[:5] == [["72"], ["10"], ["1550"], ["-2"], ["2.25"]]
    assert score(task.metric, " She sold 1,550 books.\n#### 1,550", golds[2]) == 1.0
    assert score(task.metric, " so the answer is 71", golds[0]) == 0.0


def test_ultrafeedback_chat_sft_and_dpo():
    task = fixture_task("ultrafeedback")
    assert task.prompt_format == "chat"
    sft = examples(task, "sft")[0]
    assert sft["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert sft["completion"][0]["role"] == "assistant" and len(sft["completion"]) == 1
    pair = examples(task, "dpo")[0]
    assert pair["prompt"] == sft["prompt"] and pair["chosen"] == sft["completion"]
    assert pair["rejected"] == [{"role": "assistant", "content": "Eggs are food."}]
    assert examples(task, "eval")[0]["prompt"] == "How do I boil an egg?"
    assert load_task("ultrafeedback").dpo_split == "train_prefs" and load_task("ultrafeedback").split == "train_sft"


def test_jsonl_fields_are_set_on_the_command_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "2+2?", "a": 4, "good": " four", "bad": " five"}\n')
    task = load_task("jsonl", path=str(path), prompt_field="q", completion_field="a", chosen_field="good",
                     rejected_field="bad")
    assert examples(task, "sft") == [{"prompt": "2+2?", "completion": "4"}]
    assert examples(task, "dpo") == [{"prompt": "2+2?", "chosen": " four", "rejected": " five"}]
    assert examples(load_task("jsonl", path=str(FIXTURES / "pairs.jsonl")), "dpo")[0]["chosen"].startswith(" fox")


def test_limit_and_dotted_fields():
    assert len(load_records(fixture_task("triviaqa", limit=3))) == 3
    rec = {"answer": {"value": "x"}}
    assert get_field(rec, "answer.value") == "x" and fill("<{answer.value}>", rec) == "<x>"


@pytest.mark.parametrize("make, method, message", [
    (lambda: load_task("nope"), "sft", "unknown task 'nope'; known tasks: gsm8k, jsonl"),
    (lambda: fixture_task("triviaqa"), "dpo", "task 'triviaqa' has no preference pairs"),
    (lambda: fixture_task("gsm8k", "ultrafeedback"), "sft", "record 1 of"),
    (lambda: fixture_task("ultrafeedback", "plain"), "sft", "has no field 'chosen'"),
    (lambda: load_task("jsonl", path="/no/such.jsonl"), "sft", "file '/no/such.jsonl' does not exist"),
])
def test_bad_tasks_and_data_give_one_clear_line(make, method, message):
    with pytest.raises(UserError) as err:
        examples(make(), method)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hub_dataset_unavailable_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = load_task("gsm8k", dataset="nobody/no-such-dataset-xyz")
    with pytest.raises(UserError, match="cannot load dataset nobody/no-such-dataset-xyz .*task.data_files="):
        examples(task, "sft")
