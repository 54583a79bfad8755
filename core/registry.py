"""Self-describing checkpoints and the registry that indexes them (the command line: training.registry).

Every tuned checkpoint folder holds a `card.json`: what it was tuned from (its anti-expert), on what
task, how, with which prompt format and tokenizer, with which config, metrics, commit and W&B run.
The registry is an index of names -> card paths, written atomically under a file lock so that the
jobs of a parallel sweep can register at the same time.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from core import PROJECT_ROOT
from core.errors import UserError
from core.files import atomic_write_json

CARD_FILE = "card.json"


@dataclass
class Card:
    name: str
    path: str  # the checkpoint folder (absolute)
    tuned_from: str  # the pretrained model this was tuned from (preset, hub id or path): the anti-expert
    task: str
    method: dict[str, Any]  # {"algorithm": "sft"|"dpo", "adaptation": "full"|"lora"|"lora-merged", ...}
    parent: str | None = None  # the checkpoint training started from: tuned_from, or a tuned one tuned further
    prompt_format: str = "{prompt}"  # how the expert saw prompts in training (proxy.prompts.render)
    added_tokens: list[str] = field(default_factory=list)  # special tokens tuning added to its tokenizer (chat markers)
    tokenizer_fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)  # evaluations added later: {task: {metric: value}}
    git_commit: str | None = None
    wandb: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Card":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def registry_path() -> Path:
    """`PROXY_REGISTRY` if set, else outputs/registry.json in the project."""
    return Path(os.environ.get("PROXY_REGISTRY", PROJECT_ROOT / "outputs" / "registry.json"))


def read_card(folder: str | Path) -> Card | None:
    """The card of a checkpoint folder, None if it has none, UserError naming the file if it is corrupt."""
    path = Path(folder) / CARD_FILE
    if not path.exists():
        return None
    try:
        return Card.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"corrupt checkpoint card {path}: {err}; re-register the checkpoint or delete the card") from None


def write_card(card: Card) -> Path:
    path = Path(card.path) / CARD_FILE
    atomic_write_json(path, asdict(card))
    return path


@contextlib.contextmanager
def _locked_index() -> Iterator[dict[str, Any]]:
    """Read-modify-write of the index under an exclusive lock; written atomically on exit."""
    index_path = registry_path()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    with open(index_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = _read_index(index_path)
        yield index
        atomic_write_json(index_path, index)


def _read_index(index_path: Path) -> dict[str, Any]:
    if not index_path.exists():
        return {}
    try:
        return json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt registry index {index_path}: {err}; delete it and re-register") from None


def register(card: Card) -> Path:
    """Write the card into its checkpoint folder and index it under its name (a newer card wins)."""
    card.path = str(Path(card.path).resolve())
    card_path = write_card(card)
    with _locked_index() as index:
        index[card.name] = {"card": str(card_path), "tuned_from": card.tuned_from, "task": card.task,
                            "created_at": card.created_at}
    return card_path


def update_scores(name_or_path: str, task: str, scores: dict[str, Any]) -> None:
    """Record an evaluation of a registered checkpoint on its card."""
    path, card = resolve(name_or_path)
    if card is None:
        return
    card.scores[task] = {**card.scores.get(task, {}), **scores}
    write_card(card)


def is_url(name: Any) -> bool:
    """Whether a model is named by its server's URL (a served base, proxy.remote)."""
    return isinstance(name, str) and re.match(r"^https?://", name) is not None


def display_name(name_or_path: str) -> str:
    """How to show a model: its registered name if it has a card, else the last part of its path or hub id
    (a served base: its server's host and port)."""
    if is_url(name_or_path):
        return urlparse(name_or_path).netloc.replace(":", "-")
    _, card = resolve(name_or_path)
    return card.name if card is not None else Path(str(name_or_path).rstrip("/")).name


def entries() -> dict[str, Any]:
    return _read_index(registry_path())


def resolve(name_or_path: str) -> tuple[str, Card | None]:
    """A checkpoint folder (with its card, if any) or a registered name -> (folder, card).

    A hub id or a folder without a card gives (as given, None): it is a plain model."""
    name_or_path = str(name_or_path)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return str(folder), read_card(folder)
    entry = entries().get(name_or_path)
    if entry is None:
        return name_or_path, None
    card_file = Path(entry["card"])
    if not card_file.exists():
        raise UserError(f"registered checkpoint '{name_or_path}' points to {card_file}, which no longer exists; "
                        "re-train it or remove it from the registry")
    card = read_card(card_file.parent)
    return card.path, card
