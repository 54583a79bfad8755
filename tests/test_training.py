"""Expert training on the tiny family: what changes, what must not, the saved checkpoint, resuming,
bad inputs, and the train -> register -> proxy.run contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CONF, FIXTURES, make_cfg
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from core.errors import UserError
from core.files import write_jsonl
from core.registry import read_card, resolve
from training import common, dpo, sft


class Snapshot(TrainerCallback):
    """The trainable model's parameters when training starts and when it ends."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(self, name):
        return not torch.equal(self.before[name], self.after[name])


class KillAfterFirstSave(TrainerCallback):
    """Stands in for a job killed right after its first checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt(f"killed at step {state.global_step}")


def logits(model, tok, text=" the quick brown fox"):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_sft_full_changes_every_trainable_tensor_and_registers(tiny_family, tmp_path):
    snap = Snapshot()
    cfg = make_cfg("sft", tiny_family.small, tmp_path, "+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}",
                   steps=8)
    metrics = sft.run(cfg, callbacks=[snap])
    assert snap.trainable and all(snap.changed(n) for n in snap.trainable)
    assert torch.isfinite(torch.tensor(metrics["last_loss"])) and metrics["last_loss"] < metrics["first_loss"]
    assert metrics["steps"] == 8

    folder = Path(metrics["path"])
    card = read_card(folder)
    assert card.tuned_from == tiny_family.small  # as given: proxy.run's anti-expert
    assert card.method == {"algorithm": "sft", "adaptation": "full", "merged": False}
    assert card.task == "jsonl" and card.prompt_format == "{prompt}"
    from core.loading import load_tokenizer
    from core.vocabulary import tokenizer_fingerprint
    assert card.tokenizer_fingerprint == tokenizer_fingerprint(load_tokenizer(tiny_family.small))
    assert card.config["training"]["max_steps"] == 8 and card.metrics["steps"] == 8
    assert resolve(metrics["name"]) == (card.path, card)
    # the job folder holds no resume checkpoints once finished; the same command again is skipped
    assert not list(folder.parent.glob("checkpoint-*"))
    assert sft.run(cfg) == json.loads((folder.parent / "result.json").read_text())["metrics"]


def test_sft_loss_is_on_the_completion_only(tiny_family, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from core.loading import load_model, load_tokenizer
    from training.tasks import examples, load_task

    task = load_task("triviaqa", data_files=str(FIXTURES / "triviaqa.jsonl"))
    rows = examples(task, "sft")
    tok = load_tokenizer(tiny_family.small)
    trainer = SFTTrainer(model=load_model(tiny_family.small, for_training=True), processing_class=tok,
                         train_dataset=Dataset.from_list(rows),
                         args=SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, max_length=64,
                                        activation_checkpointing=False))
    for row, item in zip(rows, trainer.train_dataset):
        n_prompt = len(tok(row["prompt"])["input_ids"])
        labels, ids = item["labels"], item["input_ids"]
        assert all(x == -100 for x in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id


def test_lora_trains_only_the_adapter_and_merges_to_the_same_function(tiny_family, tmp_path):
    snap = Snapshot()
    cfg = make_cfg("sft", tiny_family.small, tmp_path, "+task=triviaqa",
                   f"task.data_files={FIXTURES / 'triviaqa.jsonl'}", "peft=lora", steps=4)
    metrics = sft.run(cfg, callbacks=[snap])
    lora = {n for n in snap.before if "lora_" in n}
    assert lora and snap.trainable == lora
    assert all(snap.changed(n) for n in lora)
    assert not any(snap.changed(n) for n in snap.before if n not in lora)

    merged_dir = Path(metrics["path"])
    assert read_card(merged_dir).method == {"algorithm": "sft", "adaptation": "lora", "merged": True}
    assert not [k for k in load_file(merged_dir / "model.safetensors") if "lora" in k]
    from core.loading import load_model, load_tokenizer
    tok = load_tokenizer(merged_dir)
    merged = load_model(merged_dir)
    # transformers loads an adapter folder natively (base from adapter_config.json)
    unmerged = AutoModelForCausalLM.from_pretrained(merged_dir.parent / "adapter").eval()
    assert any("lora" in n for n, _ in unmerged.named_parameters())
    torch.testing.assert_close(logits(merged, tok), logits(unmerged, tok), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(merged, tok), logits(load_model(tiny_family.small), tok))


def test_unmerged_adapter_checkpoint_loads_as_a_model(tiny_family, tmp_path):
    cfg = make_cfg("sft", tiny_family.small, tmp_path, "+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}",
                   "peft=lora", "training.merge=false", "peft.config.target_modules=[q_proj,v_proj]", steps=2)
    folder = Path(sft.run(cfg)["path"])
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    assert read_card(folder).method["merged"] is False
    from core.loading import load_model, load_tokenizer
    model = load_model(str(folder))  # what proxy.run does with expert=<folder>
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert logits(model, load_tokenizer(str(folder))).shape[-1] == model.config.vocab_size


def test_qlora_trains_on_a_4bit_base_and_merges_into_a_plain_checkpoint(tiny_family, tmp_path):
    snap = Snapshot()
    cfg = make_cfg("sft", tiny_family.small, tmp_path, "+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}",
                   "peft=qlora", steps=2)
    folder = Path(sft.run(cfg, callbacks=[snap])["path"])
    assert any("lora_" in n for n in snap.trainable) and all("lora_" in n for n in snap.trainable)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # merged into the unquantized base, not re-quantized
    assert read_card(folder).method == {"algorithm": "sft", "adaptation": "qlora", "merged": True}
    from core.loading import load_model
    assert load_model(str(folder)).model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_dpo_changes_the_policy_and_records_rewards(tiny_family, tmp_path):
    snap = Snapshot()
    cfg = make_cfg("dpo", tiny_family.small, tmp_path, "+task=jsonl", f"task.path={FIXTURES / 'pairs.jsonl'}",
                   steps=4)
    metrics = dpo.run(cfg, callbacks=[snap])
    assert all(snap.changed(n) for n in snap.trainable)
    assert metrics["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert metrics["last_loss"] < metrics["first_loss"] and metrics["reward_accuracy"] is not None
    card = read_card(metrics["path"])
    assert card.method["algorithm"] == "dpo" and card.tuned_from == tiny_family.small


def test_chat_sft_uses_and_saves_a_chat_template(tiny_family, tmp_path):
    cfg = make_cfg("sft", tiny_family.small, tmp_path, "+task=ultrafeedback",
                   f"task.data_files={FIXTURES / 'ultrafeedback.jsonl'}", steps=2)
    folder = Path(sft.run(cfg)["path"])
    assert read_card(folder).prompt_format == "chat"
    from core.loading import load_tokenizer
    assert "[INST]" in load_tokenizer(str(folder)).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_killed_run_resumes_from_its_last_checkpoint(tiny_family, tmp_path):
    args = ("+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}", "training.save_steps=2")
    cfg = make_cfg("sft", tiny_family.small, tmp_path, *args, steps=5)
    with pytest.raises(KeyboardInterrupt, match="killed at step 2"):
        sft.run(cfg, callbacks=[KillAfterFirstSave()])
    job = common.job_dir(cfg, common.default_name(cfg, "sft"))
    assert [p.name for p in job.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (job / "result.json").exists()

    metrics = sft.run(make_cfg("sft", tiny_family.small, tmp_path, *args, steps=5))  # the same command again
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 5
    history = json.loads((job / "model" / "card.json").read_text())["metrics"]
    assert history["steps"] == 5


@pytest.mark.parametrize("overrides, message", [
    (["+task=jsonl", "task.path=/nonexistent/data.jsonl"], "file '/nonexistent/data.jsonl' does not exist"),
    (["+task=jsonl", "task.path={fixtures}/plain.jsonl", "task.prompt_field=question"],
     "has no field 'question' needed for the prompt"),
    (["+task=jsonl", "task.path={empty}"], "holds no records"),
    (["+task=triviaqa", "task.data_files={fixtures}/gsm8k.jsonl"], "has no field 'answer.value'"),
    (["+task=jsonl"], "task 'jsonl' has no data: pass task.path=<file.jsonl>"),
    ([], "no task given: pass +task=<name>"),
    (["+task=jsonl", "task.path={fixtures}/plain.jsonl", "+training.args.not_an_option=1"],
     "unknown training option(s) ['not_an_option']"),
    (["+task=jsonl", "task.path={fixtures}/plain.jsonl", "training.max_steps=abc"],
     "training option max_steps='abc' must be int"),
    (["+task=jsonl", "task.path={fixtures}/plain.jsonl", "task.limit=0"], "task.limit"),
    (["+task=jsonl", "task.path={fixtures}/plain.jsonl", "peft=lora", "peft.config.target_modules=[nope]"],
     "LoRA target module(s) ['nope'] match no module of the model; its linear layers are: down_proj"),
    (["+task=jsonl", "task.path={fixtures}/plain.jsonl", "peft=lora", '+task.added_tokens=["<|end|>"]'],
     "adds tokens to the tokenizer (<|end|>); their embedding rows must be trained, which LoRA does not do"),
    (["+task=jsonl", "task.path={fixtures}/plain.jsonl", '+task.end_of_turn="<|end|>"'],
     "its end_of_turn '<|end|>' is not a token; add it with task.added_tokens"),
])
def test_bad_inputs_fail_with_one_clear_line_before_training(tiny_family, tmp_path, overrides, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    overrides = [o.format(fixtures=FIXTURES, empty=empty) for o in overrides]
    cfg = make_cfg("sft", tiny_family.small, tmp_path, *overrides)
    with pytest.raises(UserError) as err:
        sft.run(cfg, callbacks=[_FailIfTraining()])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dpo_on_a_task_without_pairs_and_a_missing_model_are_refused(tiny_family, tmp_path):
    cfg = make_cfg("dpo", tiny_family.small, tmp_path, "+task=triviaqa",
                   f"task.data_files={FIXTURES / 'triviaqa.jsonl'}")
    with pytest.raises(UserError, match="task 'triviaqa' has no preference pairs"):
        dpo.run(cfg)
    cfg = make_cfg("sft", str(tmp_path / "no_such_model"), tmp_path, "+task=jsonl",
                   f"task.path={FIXTURES / 'plain.jsonl'}")
    with pytest.raises(UserError, match="checkpoint path .*no_such_model' does not exist"):
        sft.run(cfg)


class _FailIfTraining(TrainerCallback):
    def on_train_begin(self, *args, **kwargs):
        raise AssertionError("training started despite bad input")



def test_contract_train_then_proxy_run_without_anti_expert(tiny_family, tmp_path, monkeypatch):
    """A trained checkpoint, logged to W&B, is what proxy.run takes (its folder or its registered name) as
    the expert, with the anti-expert from its card. (The command line's last line, the folder: test_faults.)"""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("sft", tiny_family.small, tmp_path / "outputs", "+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}",
                   "logger=wandb", "name=contract-expert", steps=3)
    folder = sft.run(cfg)["path"]
    card = read_card(folder)
    assert card.name == "contract-expert" and card.tuned_from == tiny_family.small
    assert card.wandb.get("id") and card.wandb.get("artifact") == "contract-expert:latest"
    assert resolve("contract-expert")[0] == folder

    from proxy import run as proxy_run
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": " the quick brown"}, {"prompt": " a b c"}])
    for expert in (folder, "contract-expert"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("proxy", overrides=[f"expert={expert}", f"base={tiny_family.large}",
                                              f"prompts={prompts}", "logger=none", "generation.max_new_tokens=4"])
        run_dir = tmp_path / f"proxy-{expert.replace('/', '_')[-20:]}"
        metrics = proxy_run.run(cfg, out_dir=str(run_dir))
        assert metrics["anti_expert"] == tiny_family.small and metrics["num_prompts"] == 2
        assert (run_dir / "generations.jsonl").exists()


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_text("x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert common.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert common.last_checkpoint(tmp_path / "none") is None


def test_rows_for_added_tokens_come_from_the_run_s_seed(tiny_family):
    """The chat expert's new rows (mean resizing draws them) are the same whatever ran before in the
    process, so a stage gives the same checkpoint in a worker of its own as after other stages."""
    from omegaconf import OmegaConf

    from core.loading import load_model, load_tokenizer

    def resized(seed_before: int) -> torch.Tensor:
        model, tokenizer = load_model(tiny_family.small), load_tokenizer(tiny_family.small)
        tokenizer.add_special_tokens({"extra_special_tokens": ["<|user|>", "<|end|>"]})
        torch.manual_seed(seed_before)  # what an earlier run left in the global generator
        common.fit_to_tokenizer(model, tokenizer, OmegaConf.create({"name": "chat"}), seed=42)
        assert torch.initial_seed() == seed_before  # the draw leaves the caller's generator alone
        return model.get_input_embeddings().weight[-2:].detach().clone()

    first, second = resized(0), resized(1)
    assert first.shape[0] == 2 and torch.equal(first, second)
