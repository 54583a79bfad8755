"""An unmerged LoRA expert and its anti-expert as one small model give the same tokens as two models."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from core.loading import load_model, load_tokenizer
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from proxy.shared_pair import SharedLoraPair, load_shared_pair
from proxy.speculative import SpeculativeProxyEngine


@pytest.fixture(scope="module")
def lora(tiny_family, tmp_path_factory):
    torch.manual_seed(0)
    small = load_model(tiny_family.small)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(small, config).eval()
    with torch.no_grad():  # a visible effect: scale the random adapters up
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(folder)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {"peft": peft_model, "merged": merged, "anti": load_model(tiny_family.small), "folder": str(folder),
            "large": load_model(tiny_family.large), "tok": load_tokenizer(tiny_family.large)}


def test_shared_pair_gives_the_tokens_of_two_models(lora, prompts):
    settings = GenerationSettings(max_new_tokens=20)
    two = ProxyEngine(lora["large"], lora["tok"], [SteeringPair(lora["merged"], lora["anti"], 1.0)])
    shared = SharedLoraPair(lora["peft"])
    one = ProxyEngine(lora["large"], lora["tok"], [SteeringPair(shared, shared, 1.0, shared=True)])
    want = [g.token_ids for g in two.generate(prompts, settings)]
    assert [g.token_ids for g in one.generate(prompts, settings)] == want
    # and the adapter matters: without it the proxy is the base
    plain = ProxyEngine(lora["large"], lora["tok"]).generate(prompts, settings)
    assert [g.token_ids for g in plain] != want
    # one forward per step for the pair, instead of two
    assert len(one.last_stats.per_model_forwards) == 2 and len(two.last_stats.per_model_forwards) == 3


def test_shared_pair_loads_from_an_adapter_folder_and_speculates(lora, prompts):
    settings = GenerationSettings(max_new_tokens=16)
    shared = load_shared_pair(lora["folder"])
    pair = [SteeringPair(shared, shared, 1.0, shared=True)]
    want = [g.token_ids for g in ProxyEngine(lora["large"], lora["tok"], pair).generate(prompts, settings)]
    spec = SpeculativeProxyEngine(lora["large"], lora["tok"], pair, k=3)
    assert [g.token_ids for g in spec.generate(prompts, settings)] == want
    # only the base verifies: the drafting forwards already carry the anti-expert's logits
    assert len(spec.last_stats.per_model_forwards) == 2


def test_a_shared_pair_s_rows_join_and_leave_a_running_batch(lora, prompts):
    """Its cache holds each row twice (adapter on, then off): joining and leaving keep both halves aligned."""
    from test_zoo import live_outputs

    shared = load_shared_pair(lora["folder"])
    engine = ProxyEngine(lora["large"], lora["tok"], [SteeringPair(shared, shared, 1.0, shared=True)])
    settings = GenerationSettings(max_new_tokens=16, batch_size=1)
    batch = prompts + prompts[::-1]
    assert live_outputs(engine, batch, settings) == [g.token_ids for g in engine.generate(batch, settings)]
