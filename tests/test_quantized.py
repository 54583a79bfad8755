"""A base loaded 4-bit NF4 through bitsandbytes decodes through the engine (bitsandbytes runs on the CPU)."""
from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from core.loading import load_model, load_tokenizer, resolve_spec
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair

pytest.importorskip("bitsandbytes")


def test_nf4_base_loads_and_decodes(tiny_family, prompts):
    spec = resolve_spec(tiny_family.large, {"quantization": "nf4", "dtype": "float32"})
    base = load_model(spec)
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    tok = load_tokenizer(tiny_family.large)
    pair = SteeringPair(load_model(tiny_family.expert), load_model(tiny_family.small), alpha=1.0)
    gens = ProxyEngine(base, tok, [pair]).generate(prompts, GenerationSettings(max_new_tokens=12))
    assert all(len(g.token_ids) > 0 for g in gens)
    # quantization perturbs the base a little, not into noise: most first tokens agree with full precision
    full = ProxyEngine(load_model(tiny_family.large), tok, [pair]).generate(prompts, GenerationSettings(max_new_tokens=1))
    agree = sum(a.token_ids[:1] == b.token_ids[:1] for a, b in zip(gens, full))
    assert agree >= len(prompts) // 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("override", [{"quantization": "int8"}, {"device_map": "cuda"},
                                      {"attn_implementation": "flash_attention_2"}])
def test_gpu_only_options_are_refused_on_the_cpu(tiny_family, override):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_model(resolve_spec(tiny_family.large, override))


def test_missing_checkpoint_path_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
