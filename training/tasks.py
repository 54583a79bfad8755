"""Tasks: where a task's records come from and how a record becomes a training or eval example.

A task is a config in conf/task/ (`+task=triviaqa`). Its records come from a hub dataset
(`datasets.load_dataset(dataset, config, split=...)`), or from a local JSONL in the dataset's own
schema (`task.data_files=...`, for offline use and tests; the `jsonl` task uses `task.path`).

Two formats:
- `template`: prompt and completion (or chosen/rejected) are format strings over the record's fields,
  with dotted paths (`" {answer.value}"`), or, with no template, a field's value as is
  (`task.prompt_field=question`).
- `chat`: a field holds a list of messages; the last message is the completion, the ones before it
  the prompt (conversational prompt/completion, which TRL renders with the chat template).

Every problem with the data is a UserError raised here, before any model is loaded.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from core import CONF_DIR
from core.errors import UserError
from core.files import read_jsonl

TASK_DIR = CONF_DIR / "task"
ROLES = ("prompt", "completion", "chosen", "rejected")
_FIELD = re.compile(r"\{([A-Za-z_][\w.]*)\}")
_MISSING = object()
# a number as people write it: optional sign and $, thousands commas, decimals
NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


def task_names() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def load_task(name_or_cfg: str | Mapping[str, Any], **overrides: Any) -> DictConfig:
    """A task config by name (conf/task/<name>.yaml) or as given, with key overrides (e.g. data_files=...)."""
    if isinstance(name_or_cfg, str):
        path = TASK_DIR / f"{name_or_cfg}.yaml"
        if not path.exists():
            raise UserError(f"unknown task '{name_or_cfg}'; known tasks: {', '.join(task_names())}")
        cfg = OmegaConf.load(path)
    else:
        cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(dict(name_or_cfg)), resolve=True))
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def get_field(record: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
    """`record["answer"]["value"]` for path "answer.value"; a null value counts as missing (datasets' json
    loader gives a record every field any record has, null where it has none)."""
    value: Any = record
    for part in path.split("."):
        if isinstance(value, Mapping) and value.get(part) is not None:
            value = value[part]
        elif default is not _MISSING:
            return default
        else:
            raise KeyError(path)
    return value


def fill(template: str, record: Mapping[str, Any]) -> str:
    """Replace each `{dotted.field}` of the template by the record's value."""
    return _FIELD.sub(lambda m: str(get_field(record, m.group(1))), template)


def _describe(task: DictConfig) -> str:
    if task.get("data_files"):
        return str(task.data_files)
    if task.get("path"):
        return str(task.path)
    return f"{task.get('dataset')} ({task.get('config')})"


def _split_for(task: DictConfig, method: str) -> str | None:
    if method == "dpo":
        return task.get("dpo_split") or task.get("split")
    if method == "eval":
        return task.get("eval_split") or task.get("split")
    return task.get("split")


def task_files(task: DictConfig) -> list[str]:
    """The local files a task reads (none for a hub dataset)."""
    local = task.get("data_files") or task.get("path")
    if isinstance(local, Mapping):
        return [str(v) for v in local.values() if v]
    return [str(local)] if local else []


def load_records(task: DictConfig, method: str = "sft") -> list[dict[str, Any]]:
    """The raw records of a task for a method (sft, dpo or eval): a local JSONL or a hub dataset split."""
    local = task.get("data_files") or task.get("path")
    if isinstance(local, Mapping):  # one file per split
        split = _split_for(task, method)
        if split not in local:
            raise UserError(f"task '{task.get('name')}' has no local file for split '{split}' "
                            f"(it has {', '.join(local)}); set task.data_files.{split}=<file.jsonl>")
        local = local[split]
    if local:
        records = read_jsonl(local)
    elif task.get("dataset"):
        records = _load_hub(task, _split_for(task, method))
    else:
        hint = "task.path=<file.jsonl>" if task.get("name") == "jsonl" else "task.dataset=<hub id> or task.data_files=<file.jsonl>"
        raise UserError(f"task '{task.get('name')}' has no data: pass {hint}")
    limit = task.get("limit")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UserError(f"task.limit must be a whole number of at least 1 (or null for every record), got {limit!r}")
        records = records[:limit]
    if not records:
        raise UserError(f"task '{task.get('name')}': {_describe(task)} holds no records")
    return records


def _load_hub(task: DictConfig, split: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        data = datasets.load_dataset(task.dataset, task.get("config"), split=split or "train")
    except Exception as err:  # offline, unknown id, unknown split: all one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load dataset {task.dataset} ({task.get('config')}, split {split}): {first}; "
            "offline, point the task at a local copy with task.data_files=<file.jsonl>"
        ) from None
    return [dict(r) for r in data]


def has_pairs(task: DictConfig) -> bool:
    return bool(task.get("chosen_field") or task.get("chosen_template")) and bool(
        task.get("rejected_field") or task.get("rejected_template"))


def _value(task: DictConfig, role: str, record: Mapping[str, Any], where: str) -> Any:
    template = task.get(f"{role}_template")
    field = task.get(f"{role}_field")
    try:
        if template is not None:
            return fill(str(template), record)
        if field is None:
            raise UserError(f"task '{task.get('name')}' sets neither {role}_field nor {role}_template")
        return get_field(record, str(field))
    except KeyError as err:
        raise UserError(
            f"task '{task.get('name')}': {where} has no field '{err.args[0]}' needed for the {role} "
            f"(fields: {sorted(record)}); set task.{role}_field=<field> or fix the data"
        ) from None


def _split_chat(messages: Any, where: str, role: str) -> tuple[list[dict], list[dict]]:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise UserError(f"{where}: the {role} field must be a list of {{role, content}} messages")
    if messages[-1].get("role") != "assistant":
        raise UserError(f"{where}: the last {role} message must be the assistant's reply")
    return [dict(m) for m in messages[:-1]], [dict(messages[-1])]


def to_example(task: DictConfig, record: Mapping[str, Any], method: str, where: str = "a record") -> dict[str, Any]:
    """One record -> {"prompt", "completion"} (sft), {"prompt", "chosen", "rejected"} (dpo) or
    {"prompt", "answers"} (eval)."""
    chat = task.get("format", "template") == "chat"
    if method == "sft":
        if chat:
            prompt, completion = _split_chat(_value(task, "completion", record, where), where, "completion")
        else:
            prompt = str(_value(task, "prompt", record, where))
            completion = str(_value(task, "completion", record, where))
        return {"prompt": prompt, "completion": completion}
    if method == "dpo":
        if chat:
            prompt, chosen = _split_chat(_value(task, "chosen", record, where), where, "chosen")
            _, rejected = _split_chat(_value(task, "rejected", record, where), where, "rejected")
        else:
            prompt = str(_value(task, "prompt", record, where))
            chosen = str(_value(task, "chosen", record, where))
            rejected = str(_value(task, "rejected", record, where))
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if method == "eval":
        return {"prompt": str(_value(task, "prompt", record, where)), "answers": answers(task, record)}
    raise ValueError(f"unknown method {method!r}")


def answers(task: DictConfig, record: Mapping[str, Any]) -> list[str]:
    """The gold answers of a record: the values of `answer_fields` (lists flattened, duplicates
    dropped), passed through `answer_extract` (gsm8k: the number after '####')."""
    out: list[str] = []
    for path in task.get("answer_fields") or []:
        value = get_field(record, str(path), default=None)
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            v = str(v)
            if task.get("answer_extract") == "gsm8k":
                v = extract_gsm8k_answer(v)
            if v is not None and v not in out:
                out.append(v)
    return out


def examples(task: DictConfig, method: str = "sft") -> list[dict[str, Any]]:
    """A task's examples for a method, every record checked; UserError on the first bad one."""
    if method == "dpo" and not has_pairs(task):
        raise UserError(
            f"task '{task.get('name')}' has no preference pairs; DPO needs chosen/rejected "
            "(e.g. +task=ultrafeedback, or +task=jsonl with task.chosen_field/task.rejected_field)"
        )
    records = load_records(task, method)
    source = _describe(task)
    return [to_example(task, r, method, where=f"record {i + 1} of {source}") for i, r in enumerate(records)]


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K solution: the one after '####' if present, else the last number
    in the text (what a model that did not learn the '####' convention ends with). Commas removed."""
    text = str(text)
    if "####" in text:
        tail = text.split("####", 1)[1]
        match = NUMBER.search(tail)
    else:
        found = list(NUMBER.finditer(text))
        match = found[-1] if found else None
    if match is None:
        return None
    value = match.group(0).replace(",", "").replace("$", "").replace(" ", "")
    return value.rstrip(".") or None
