"""The served-base invariants held against vLLM itself (the `vllm_base` server of tests/servers.py, from the
environment `make vllm` builds): with every log-probability on offer, greedy proxy output steering the base
through vLLM is the local engine's on the same weights, token for token, plain and speculative."""
from __future__ import annotations

import pytest
from helpers import SERVED_PROMPTS as PROMPTS
from helpers import assert_served_gives_the_local_tokens

from core.loading import load_model, load_tokenizer
from proxy.remote import OUTSIDE, RemoteBase

pytest_plugins = ["servers"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local(vllm_base, tiny_family):
    return {"tok": load_tokenizer(vllm_base.model), "base": load_model(vllm_base.model),
            "expert": load_model(tiny_family.expert), "small": load_model(tiny_family.small)}


@pytest.mark.parametrize("k", [None, 3], ids=["plain", "speculative"])
def test_greedy_output_through_vllm_is_the_local_engine_s(vllm_base, local, k):
    served = RemoteBase(vllm_base.url, local["tok"], model=vllm_base.name)
    assert served.top_logprobs == served.vocab_size  # served with --max-logprobs at the vocabulary
    assert_served_gives_the_local_tokens(served, local["base"], local, k, max_new_tokens=8)


def test_vllm_top_k_is_a_cut_of_the_same_law(vllm_base, local):
    full = RemoteBase(vllm_base.url, local["tok"], model=vllm_base.name)
    five = RemoteBase(vllm_base.url, local["tok"], model=vllm_base.name, top_logprobs=5, outside="zero")
    row = [local["tok"](PROMPTS[1])["input_ids"]]
    whole, cut = full.next_logprobs(row)[0, 0], five.next_logprobs(row)[0, 0]
    kept = cut > OUTSIDE
    assert int(kept.sum()) == 5
    assert set(kept.nonzero().flatten().tolist()) == set(whole.topk(5).indices.tolist())
    assert (cut[kept] - whole[kept]).abs().max() < 1e-5
