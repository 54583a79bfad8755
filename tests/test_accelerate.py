"""The multi-GPU launch configs in conf/accelerate/ parse with accelerate's own loader and launcher, FSDP
wraps each family's own decoder layer, and `accelerate launch` trains over two processes (CPU, gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "conf" / "accelerate"
EXPECTED = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
            "deepspeed_zero3": DistributedType.DEEPSPEED}


def launch_args(name: str):
    """What `accelerate launch --config_file <name>` makes of the file, before it starts anything."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_config_is_covered():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate_and_every_nested_key_is_a_launch_option(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # refuses unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name]
    assert config.mixed_precision == "bf16" and not config.use_cpu
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert set(nested) <= options, set(nested) - options  # a misspelt key would be dropped silently
    args, _ = launch_args(name)
    assert args.mixed_precision == "bf16"


@pytest.mark.parametrize("family, layer", [("qwen2", "Qwen2DecoderLayer"), ("pythia", "GPTNeoXLayer"),
                                           ("gemma2", "Gemma2DecoderLayer")])
def test_fsdp_shards_fully_wraps_each_family_s_own_layers_and_checkpoints_activations(zoo, family, layer):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from core.loading import load_model

    args, _ = launch_args("fsdp")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):  # the environment each rank would get
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert plugin.transformer_cls_names_to_wrap is None  # not a Llama class: the model's own, at wrap time
    plugin.set_auto_wrap_policy(load_model(getattr(zoo[family], "anti"), for_training=True))
    assert plugin.transformer_cls_names_to_wrap == [layer]
    assert plugin.activation_checkpointing is True
    assert "training.activation_checkpointing=false" in (CONFIGS / "fsdp.yaml").read_text()  # transformers 5 refuses both


def test_the_trainer_s_arguments_exist_before_the_model_loads(tiny_family, tmp_path, monkeypatch):
    """Under ZeRO-3, TrainingArguments set up DeepSpeed's partitioned loading; they must come first."""
    from helpers import FIXTURES, make_cfg

    from training import common

    order = []
    for name in ("trainer_config", "load_model"):
        real = getattr(common, name)
        monkeypatch.setattr(common, name, lambda *a, _real=real, _name=name, **k: (order.append(_name), _real(*a, **k))[1])
    common.train(make_cfg("sft", tiny_family.small, tmp_path, "+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}",
                          steps=1), "sft")
    assert order[:2] == ["trainer_config", "load_model"]


def test_deepspeed_zero3_partitions_at_init_and_saves_a_16bit_model():
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml"))
    ds = config.deepspeed_config
    assert ds["zero_stage"] == 3 and ds["zero3_init_flag"] and ds["zero3_save_16bit_model"]
    assert "gradient_accumulation_steps" not in ds  # taken from the training config ("auto")


@pytest.mark.slow
def test_accelerate_launch_trains_a_qwen2_lora_expert_on_two_processes(zoo, tmp_path):
    """Data-parallel over 2 CPU processes (gloo), no device map per process; one card, one registry entry."""
    task = ROOT / "tests" / "fixtures" / "plain.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no",
           "-m", "training.sft", "+task=jsonl", f"task.path={task}", f"model={zoo['qwen2'].anti}", "peft=lora",
           "training.max_steps=2", "training.per_device_train_batch_size=2", "logger=none",
           f"output_dir={tmp_path / 'job'}", f"paths.outputs={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr
    model_dir = tmp_path / "job" / "model"
    assert proc.stdout.count(str(model_dir)) == 2  # both processes finished (their lines may interleave)
    card = json.loads((model_dir / "card.json").read_text())
    assert card["metrics"]["steps"] == 2 and card["tuned_from"] == zoo["qwen2"].anti
    assert card["method"] == {"algorithm": "sft", "adaptation": "lora", "merged": True}
    assert list(json.loads(Path(os.environ["PROXY_REGISTRY"]).read_text())) == [card["name"]]
