"""Where models go, decided as if the GPUs were there (core.placement is a pure function of the machine)."""
from __future__ import annotations

import pytest
import torch

from core import loading
from core.errors import UserError
from core.placement import (
    Machine,
    compute_dtype,
    decoding_device_map,
    training_device_map,
)

CPU = Machine()
ONE = Machine(gpus=1, free=(80 << 30,), bf16=True)
FOUR = Machine(gpus=4, free=(10 << 30, 50 << 30, 30 << 30, 20 << 30), bf16=True)


@pytest.mark.parametrize("role", ["base", "expert", "anti_expert"])
def test_without_a_gpu_every_model_stays_on_the_cpu(role):
    assert decoding_device_map(role, None, CPU) is None


@pytest.mark.parametrize("role", ["base", "expert", "anti_expert"])
def test_one_gpu_holds_every_model_whole(role):
    assert decoding_device_map(role, None, ONE) == {"": 0}


def test_several_gpus_spread_the_base_and_keep_each_small_model_whole_on_the_freest():
    assert decoding_device_map("base", None, FOUR) == "auto"
    assert decoding_device_map("expert", None, FOUR) == {"": 1}
    after_expert = Machine(gpus=4, free=(10 << 30, 36 << 30, 30 << 30, 20 << 30), bf16=True)
    assert decoding_device_map("anti_expert", None, after_expert) == {"": 1}
    after_both = Machine(gpus=4, free=(10 << 30, 22 << 30, 30 << 30, 20 << 30), bf16=True)
    assert decoding_device_map("anti_expert", None, after_both) == {"": 2}


def test_a_device_map_the_user_gives_wins():
    assert decoding_device_map("expert", "cuda:3", FOUR) == "cuda:3"
    assert decoding_device_map("base", {"": 1}, ONE) == {"": 1}


def test_training_leaves_placement_to_the_trainer():
    assert training_device_map(None, quantized=False, machine=ONE) is None
    assert training_device_map(None, quantized=False, machine=Machine(gpus=8, world_size=8, local_rank=3)) is None
    # a 4-bit model is placed at load: on this process's own GPU, or the CPU
    assert training_device_map(None, quantized=True, machine=Machine(gpus=8, world_size=8, local_rank=3)) == {"": 3}
    assert training_device_map(None, quantized=True, machine=CPU) == "cpu"
    with pytest.raises(UserError, match="distributed launch of 8 processes"):
        training_device_map("auto", quantized=False, machine=Machine(gpus=8, world_size=8))


def test_a_4bit_model_computes_in_bf16_on_a_gpu_unless_told():
    assert compute_dtype("auto", ONE) == torch.bfloat16
    assert compute_dtype("auto", Machine(gpus=1, free=(1,), bf16=False)) == torch.float16
    assert compute_dtype("auto", CPU) == torch.float32
    assert compute_dtype(torch.float16, ONE) == torch.float16


def test_load_model_passes_the_placement_to_transformers(tiny_family, monkeypatch):
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(loading, "check_spec", lambda spec: None)  # the CPU-only refusals are tested elsewhere
    for role, machine, want in (("expert", FOUR, {"": 1}), ("base", FOUR, "auto"), ("base", ONE, {"": 0})):
        seen.clear()
        with pytest.raises(UserError):
            loading.load_model(tiny_family.small, role=role, machine=machine)
        assert seen["device_map"] == want
    seen.clear()
    spec = loading.resolve_spec(tiny_family.large, {"quantization": "nf4"})
    with pytest.raises(UserError):
        loading.load_model(spec, role="base", machine=ONE)
    assert seen["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16 and seen["device_map"] == {"": 0}


def test_proxy_run_loads_each_model_in_its_role(tiny_family, monkeypatch):
    from omegaconf import OmegaConf

    from proxy import build

    roles = []
    real = build.load_model

    def spy(spec, **kwargs):
        roles.append(kwargs.get("role"))
        return real(spec, **kwargs)

    monkeypatch.setattr(build, "load_model", spy)
    none = {"dtype": None, "quantization": None, "device_map": None, "attn_implementation": None}
    cfg = OmegaConf.create({"base": tiny_family.large, "expert": tiny_family.expert, "anti_expert": tiny_family.small,
                            "load": {"base": none, "expert": none, "anti_expert": none},
                            "proxy": {"alpha": 1.0, "expert_format": None, "extra_pairs": []}})
    build.build_engine(cfg)
    assert sorted(roles) == ["anti_expert", "base", "expert"]
