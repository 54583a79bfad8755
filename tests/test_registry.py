"""Cards and the registry: round trip, lookup by name or folder, scores, the CLI, and proxy.run's use
of a card (anti-expert and prompt format)."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from core.errors import UserError
from core.registry import Card, entries, read_card, register, resolve, update_scores
from proxy.build import resolve_pair
from training.registry import main


@pytest.fixture
def registered(tiny_family, tmp_path):
    folder = tmp_path / "chat-expert"
    shutil.copytree(tiny_family.expert, folder)
    card = Card(name="chat-expert-test", path=str(folder), tuned_from=tiny_family.small, task="ultrafeedback",
                method={"algorithm": "dpo", "adaptation": "lora", "merged": True}, prompt_format="chat",
                tokenizer_fingerprint="sha256:0", config={"training": {"beta": 0.1}}, metrics={"steps": 3},
                git_commit=None, wandb={"id": "abc"})
    register(card)
    return card


def test_card_round_trips_through_the_folder_and_the_index(registered):
    again = read_card(registered.path)
    assert asdict(again) == asdict(registered)
    assert resolve("chat-expert-test") == (registered.path, again)
    assert resolve(registered.path)[1] == again
    assert entries()["chat-expert-test"]["tuned_from"] == registered.tuned_from


def test_plain_models_and_hub_ids_have_no_card(tiny_family):
    assert resolve(tiny_family.small) == (tiny_family.small, None)
    assert resolve("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", None)


def test_scores_are_added_to_the_card(registered):
    update_scores("chat-expert-test", "gsm8k", {"accuracy": 0.25})
    update_scores("chat-expert-test", "gsm8k", {"n": 8})
    assert read_card(registered.path).scores == {"gsm8k": {"accuracy": 0.25, "n": 8}}


def test_proxy_run_takes_anti_expert_and_format_from_the_card(registered, tiny_family):
    pair = resolve_pair("chat-expert-test", None, 1.0, None)
    assert (pair.expert, pair.anti_expert, pair.expert_format) == (registered.path, tiny_family.small, "chat")
    explicit = resolve_pair("chat-expert-test", tiny_family.expert, 0.5, "{prompt}")
    assert (explicit.anti_expert, explicit.expert_format) == (tiny_family.expert, "{prompt}")
    with pytest.raises(UserError, match="pass anti_expert="):
        resolve_pair(tiny_family.expert, None, 1.0, None)


def test_a_moved_checkpoint_and_a_corrupt_card_are_clear_errors(registered):
    Path(registered.path, "card.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt checkpoint card"):
        resolve(registered.path)
    shutil.rmtree(registered.path)
    with pytest.raises(UserError, match="no longer exists"):
        resolve("chat-expert-test")


def test_cli_lists_and_shows(registered, capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert "chat-expert-test" in out and "dpo lora merged" in out
    main(["show", "chat-expert-test"])
    assert json.loads(capsys.readouterr().out)["tuned_from"] == registered.tuned_from
    with pytest.raises(SystemExit) as err:
        main(["show", "nobody"])
    assert err.value.code == 2
