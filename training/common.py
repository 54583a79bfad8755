"""What SFT and DPO share: the model to tune, PEFT, the trainer's arguments, resuming, merging, and
the card that registers the result.

A job's folder is `${paths.outputs}/train/<name>` (or `output_dir=`). The name defaults to the task,
algorithm, adaptation, model and a hash of the config, so running the same command again finds the
same folder: it resumes from the last `checkpoint-N` there, or, if the job finished, skips it.

    <job>/checkpoint-N/   resume state (removed once the job finishes, unless training.keep_checkpoints)
    <job>/adapter/        the LoRA adapter (LoRA only)
    <job>/model/          the checkpoint: full weights (or the adapter, with training.merge=false),
                          tokenizer and card.json; what proxy.run loads and what gets registered
    <job>/wandb/          the W&B run
    <job>/result.json     the finished job's metrics
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from core import PROJECT_ROOT
from core.errors import UserError
from core.files import apply_umask, atomic_write_json
from core.jobs import config_hash, inputs_digest, run_job
from core.loading import ModelSpec, check_spec, load_model, load_tokenizer, resolve_spec
from core.registry import Card, register
from core.vocabulary import tokenizer_fingerprint
from training import tasks as tasks_lib

MODEL_KEY = "model"
# keys of the training group that are ours, not the TRL config's
OWN_TRAINING_KEYS = {"merge", "keep_checkpoints", "args"}


# ---------------------------------------------------------------- config checks


def check_task(cfg: DictConfig) -> DictConfig:
    task = cfg.get("task")
    if not task:
        raise UserError(f"no task given: pass +task=<name> (one of {', '.join(tasks_lib.task_names())})")
    return task


def adaptation(cfg: DictConfig) -> str:
    """full, lora or qlora."""
    name = str(cfg.peft.get("name") or "none")
    return "full" if name == "none" else name


def model_spec(cfg: DictConfig) -> ModelSpec:
    """The model to tune, with `load.*` overrides and the PEFT quantization; checked, paths made absolute
    (an unmerged adapter records its base's path, which must work from any folder)."""
    overrides = dict(OmegaConf.to_container(cfg.get("load") or {}, resolve=True))
    if cfg.peft.get("quantization"):
        overrides["quantization"] = cfg.peft.quantization
    spec = resolve_spec(cfg[MODEL_KEY], overrides)
    check_spec(spec)
    if Path(spec.path).expanduser().is_dir():
        spec = dataclasses.replace(spec, path=str(Path(spec.path).expanduser().resolve()))
    return spec


def peft_config(cfg: DictConfig):
    if adaptation(cfg) == "full" or cfg.peft.get("config") is None:
        return None
    from hydra.utils import instantiate

    return instantiate(cfg.peft.config, _convert_="all")


def check_lora_targets(model, config) -> None:
    """Refuse target modules that match nothing, naming the model's linear layers to choose from."""
    targets = getattr(config, "target_modules", None)
    if targets is None or targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules()]
    if isinstance(targets, str):  # a regex over full module names, as peft reads it
        if not any(re.fullmatch(targets, n) for n in names):
            raise UserError(f"LoRA target_modules regex {targets!r} matches no module of the model; "
                            f"its linear layers are: {', '.join(linear_layer_names(model))}")
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(
            f"LoRA target module(s) {missing} match no module of the model; its linear layers are: "
            f"{', '.join(linear_layer_names(model))} (set peft.config.target_modules=[...])"
        )


def linear_layer_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def trainer_config(cfg: DictConfig, algorithm: str, out_dir: Path, report_to: str):
    """SFTConfig or DPOConfig from the training group; UserError naming an unknown option."""
    from trl import DPOConfig, SFTConfig

    cls = SFTConfig if algorithm == "sft" else DPOConfig
    training = OmegaConf.to_container(cfg.training, resolve=True)
    kwargs = {k: v for k, v in training.items() if k not in OWN_TRAINING_KEYS and v is not None}
    kwargs.update(training.get("args") or {})
    if training.get("bf16") is None:
        # CPU bf16 autocast is slow and only good for debugging; GPUs train in bf16 as TRL does
        kwargs["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if not torch.cuda.is_available():
        kwargs.setdefault("dataloader_pin_memory", False)  # nothing to pin to; silences a warning per run
    kwargs.update(output_dir=str(out_dir), report_to=report_to, run_name=out_dir.name)
    _refuse_wrong_types(cls, kwargs)
    from transformers import HfArgumentParser

    try:  # the parser refuses the names the config does not have
        (args,) = HfArgumentParser(cls).parse_dict(kwargs)
    except ValueError as err:
        message = str(err).strip().splitlines()[0]
        if "not used by the HfArgumentParser" in message:
            unknown = message.split(":", 1)[1].strip()
            raise UserError(f"unknown training option(s) {unknown} for {cls.__name__}; see its fields in TRL's docs"
                            ) from None
        raise UserError(f"bad training option: {message}") from None
    except TypeError as err:
        raise UserError(f"bad training option: {str(err).strip().splitlines()[0]}") from None
    return args


def _refuse_wrong_types(cls, kwargs: dict) -> None:
    """parse_dict passes values through unconverted, so training.max_steps=abc would fail deep in the
    Trainer: a number or flag field given something else is refused here, by name."""
    import dataclasses
    import types

    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in kwargs.items():
        kind = fields.get(key)
        if kind is None or value is None:
            continue
        allowed = set(kind.__args__) if isinstance(kind, types.UnionType) else {kind}
        allowed.discard(type(None))
        if not allowed <= {int, float, bool}:
            continue  # strings, enums, lists: the config's own checks apply
        ok = (isinstance(value, bool) if allowed == {bool}
              else isinstance(value, (int, float)) and not isinstance(value, bool)
              and (float in allowed or isinstance(value, int)))
        if not ok:
            expected = " or ".join(sorted(t.__name__ for t in allowed))
            raise UserError(f"training option {key}={value!r} must be {expected}; "
                            f"set it as training.{key}=<{expected}>")


# ---------------------------------------------------------------- names and folders


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.") or "model"


def default_name(cfg: DictConfig, algorithm: str) -> str:
    """<task>-<algorithm>-<adaptation>-<model>-<config hash>: deterministic, so a re-run finds its job."""
    model = Path(str(cfg[MODEL_KEY]).rstrip("/")).name
    return f"{_slug(cfg.task.name)}-{algorithm}-{adaptation(cfg)}-{_slug(model)}-{config_hash(cfg)[:8]}"


def job_dir(cfg: DictConfig, name: str) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path(cfg.paths.outputs) / "train" / name


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint-N folder. The Trainer writes trainer_state.json last, so a run
    killed while saving leaves a folder without it, which is skipped for the one before."""
    if not folder.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and p.is_dir())
    complete = [p for _, p in steps if (p / "trainer_state.json").exists()]
    return str(complete[-1]) if complete else None


def resumable_checkpoint(out: Path, cfg: DictConfig, digest: str) -> str | None:
    """The checkpoint to resume from: the newest one, if it was written by this config from these inputs.
    Checkpoints from other inputs (data edited, the model retrained since) are removed, and the job
    records what it starts from (`job.json`)."""
    marker = out / "job.json"
    started = {"config_hash": config_hash(cfg), "inputs_digest": digest}
    try:
        same = json.loads(marker.read_text()) == started
    except (OSError, json.JSONDecodeError):
        same = False
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under a distributed launch, one process tidies up
        if not same:
            for stale in out.glob("checkpoint-*"):
                print(f"inputs changed since {stale} was written: starting over")
                shutil.rmtree(stale, ignore_errors=True)
        atomic_write_json(marker, started)
    return last_checkpoint(out) if same else None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---------------------------------------------------------------- training


def train(cfg: DictConfig, algorithm: str, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train an expert with TRL (algorithm "sft" or "dpo"), save, register; return the metrics
    (with `path`, the checkpoint folder, and `name`, its registered name)."""
    task = check_task(cfg)
    spec = model_spec(cfg)
    name = cfg.get("name") or default_name(cfg, algorithm)
    out = job_dir(cfg, name)
    digest = inputs_digest([*tasks_lib.task_files(task), spec.path])

    def fit(tracker) -> dict[str, Any]:
        examples = tasks_lib.examples(task, algorithm)
        tokenizer = training_tokenizer(spec, task)
        check_new_tokens(cfg, tokenizer, spec)
        lora = peft_config(cfg)
        resume = resumable_checkpoint(out, cfg, digest)
        # the trainer's arguments exist before the model loads, so that under `accelerate launch` with
        # DeepSpeed ZeRO-3 the weights are partitioned as they load (no process holds the whole model)
        args = trainer_config(cfg, algorithm, out, report_to="wandb" if tracker.run is not None else "none")
        model = load_model(spec, for_training=True)
        fit_to_tokenizer(model, tokenizer, task, seed=args.seed)
        if lora is not None:
            check_lora_targets(model, lora)
            if spec.quantization:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=bool(cfg.training.get("activation_checkpointing")))
        import datasets

        trainer = _make_trainer(algorithm, model, spec, args, datasets.Dataset.from_list(examples), tokenizer,
                                lora, callbacks)
        if resume:
            print(f"resuming from {resume}")
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = training_metrics(trainer, result, resumed_from=resume)
        model_dir = save_checkpoint(cfg, trainer, tokenizer, spec, out)
        metrics.update(path=str(model_dir.resolve()), name=name)
        if trainer.is_world_process_zero():  # under `accelerate launch`, one process registers
            publish(cfg, algorithm, name, model_dir, tokenizer, metrics, tracker)
        trainer.accelerator.wait_for_everyone()
        return metrics

    metrics = run_job(cfg, out, algorithm, digest, str(out / "model"), fit)
    if not cfg.training.get("keep_checkpoints") and int(os.environ.get("RANK", "0") or 0) == 0:
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def training_tokenizer(spec: ModelSpec, task: DictConfig):
    """The model's tokenizer, given the task's chat template when the task trains in chat format, and the
    task's added special tokens (a chat template's role and end-of-turn markers, as ChatML on a Llama or
    Mistral vocabulary): they take the next ids, after every token of the pretrained vocabulary."""
    tokenizer = load_tokenizer(spec)
    added = [t for t in task.get("added_tokens") or [] if t not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    if task.get("prompt_format") == "chat" and not getattr(tokenizer, "chat_template", None):
        if not task.get("chat_template"):
            raise UserError(f"task '{task.name}' trains in chat format but the tokenizer of '{spec.path}' has no "
                            "chat template; set task.chat_template=<jinja template>")
        tokenizer.chat_template = task.chat_template
    return tokenizer


def fit_to_tokenizer(model, tokenizer, task: DictConfig, seed: int) -> None:
    """Rows for the tokens the tokenizer added (transformers' mean resizing: new rows drawn around the mean
    of the trained ones, from the run's seed, so the draw does not depend on what ran before in the
    process), and the task's end of turn among the ids the model stops at, as an instruct model's
    generation config lists it (proxy decoding folds it into the shared end of sequence)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    end = task.get("end_of_turn")
    if end:
        if end not in tokenizer.get_vocab():
            raise UserError(f"task '{task.name}': its end_of_turn {end!r} is not a token; add it with task.added_tokens")
        ids = model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        model.generation_config.eos_token_id = [*ids, tokenizer.convert_tokens_to_ids(end)]


def check_new_tokens(cfg: DictConfig, tokenizer, spec: ModelSpec) -> None:
    """Tokens the task adds need their embedding rows trained, which LoRA leaves frozen (and TRL's fused LM
    head reads the embedding matrix directly, so PEFT's trainable tokens cannot stand in)."""
    if adaptation(cfg) != "full" and len(tokenizer) > len(load_tokenizer(spec)):
        raise UserError(f"task '{cfg.task.name}' adds tokens to the tokenizer ({', '.join(cfg.task.added_tokens)}); "
                        "their embedding rows must be trained, which LoRA does not do: tune it fully (peft=none)")


def publish(cfg: DictConfig, algorithm: str, name: str, model_dir: Path, tokenizer, metrics: dict[str, Any],
            tracker) -> None:
    """The checkpoint's card, its W&B artifact, and its registry entry."""
    card = make_card(cfg, algorithm, name, model_dir, tokenizer, metrics, tracker.info)
    art = tracker.artifact(str(model_dir), _slug(name), "model",
                           metadata={"tuned_from": card.tuned_from, "task": card.task, **card.method},
                           link_to=cfg.get("link_to"))
    if art:
        card.wandb["artifact"] = art
    register(card)
    tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def _make_trainer(algorithm, model, spec, args, dataset, tokenizer, lora, callbacks):
    from transformers import TrainerCallback
    from trl import DPOTrainer, SFTTrainer

    class UmaskModes(TrainerCallback):
        """Resume checkpoints get the mode the umask gives (safetensors writes its files owner-only)."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                apply_umask(folder)

    common = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                  callbacks=[UmaskModes(), *callbacks])
    if algorithm == "sft":
        return SFTTrainer(**common)
    # the reference is the model as it was before tuning: with LoRA, the same model with its adapter
    # off (ref_model=None); in full tuning, a frozen second copy
    ref = None
    if lora is None:  # placed like the model to tune: by the trainer, which also freezes it
        ref = load_model(spec, for_training=True).eval()
    return DPOTrainer(ref_model=ref, **common)


def training_metrics(trainer, result, resumed_from: str | None = None) -> dict[str, Any]:
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "train_loss": result.metrics.get("train_loss"),
        "runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "resumed_from_step": int(Path(resumed_from).name.split("-")[-1]) if resumed_from else None,
    }
    last = next((h for h in reversed(trainer.state.log_history) if "rewards/accuracies" in h), None)
    if last is not None:  # DPO
        metrics["reward_accuracy"] = last["rewards/accuracies"]
        metrics["reward_margin"] = last.get("rewards/margins")
    return metrics


def merge_wanted(cfg: DictConfig) -> bool:
    merge = cfg.training.get("merge")
    return adaptation(cfg) != "full" and (merge is None or bool(merge))


def save_checkpoint(cfg: DictConfig, trainer, tokenizer, spec: ModelSpec, out: Path) -> Path:
    """Write the checkpoint proxy.run loads into <job>/model: full weights, a merged LoRA, or the adapter.

    Every process calls the trainer's save (under FSDP or ZeRO-3 it gathers the shards); the first
    process alone merges, copies and writes the tokenizer."""
    model_dir = out / "model"
    main = trainer.is_world_process_zero()
    if main and model_dir.exists():
        shutil.rmtree(model_dir)
    trainer.accelerator.wait_for_everyone()
    if adaptation(cfg) == "full":
        trainer.save_model(str(model_dir))
    else:
        adapter_dir = out / "adapter"
        trainer.save_model(str(adapter_dir))
        if main and merge_wanted(cfg):
            merged = merge_adapter(trainer.model, spec, adapter_dir, trainer.args.world_size)
            merged.save_pretrained(str(model_dir))
        elif main:
            # transformers loads an adapter folder as a model (it reads the base from adapter_config.json)
            shutil.copytree(adapter_dir, model_dir, dirs_exist_ok=True)
    if main:
        tokenizer.save_pretrained(str(model_dir))
        for folder in (model_dir, out / "adapter"):
            if folder.is_dir():
                apply_umask(folder)
    trainer.accelerator.wait_for_everyone()
    return model_dir


def merge_adapter(peft_model, spec: ModelSpec, adapter_dir: Path, world_size: int = 1):
    """The base with the adapter folded in. In one process the adapter is folded into the trained model;
    a 4-bit base, or a model sharded over processes, is reloaded whole and unquantized with the saved
    adapter first, so the merged checkpoint is a plain full model."""
    if not spec.quantization and world_size == 1:
        return peft_model.merge_and_unload()
    from peft import PeftModel

    base = load_model(dataclasses.replace(spec, quantization=None, device_map=None), for_training=True)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def pretrained_root(model: str) -> str:
    """What a model was ultimately tuned from: a tuned checkpoint's own `tuned_from`, else itself.

    An expert tuned further (DPO on an SFT expert) keeps the pretrained model as its anti-expert, as
    the paper's chat expert (SFT then RLHF) is steered against the untuned base."""
    from core.registry import resolve

    _, card = resolve(model)
    return card.tuned_from if card is not None else model


def make_card(cfg: DictConfig, algorithm: str, name: str, model_dir: Path, tokenizer, metrics: dict[str, Any],
              wandb_info: dict[str, Any]) -> Card:
    parent = str(cfg[MODEL_KEY])
    return Card(
        name=name,
        path=str(model_dir.resolve()),
        tuned_from=pretrained_root(parent),
        parent=parent,
        task=str(cfg.task.name),
        method={"algorithm": algorithm, "adaptation": adaptation(cfg),
                "merged": merge_wanted(cfg) if adaptation(cfg) != "full" else False},
        prompt_format=str(cfg.task.get("prompt_format") or "{prompt}"),
        added_tokens=list(cfg.task.get("added_tokens") or []),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        config=json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str)),
        metrics=dict(metrics),
        git_commit=git_commit(),
        wandb=dict(wandb_info),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
