"""vLLM's OpenAI server (from .venv-vllm, `make vllm`) on a tiny float32 Llama answers transformers' own
next-token log-probabilities, over the whole vocabulary, for a token-id prompt, for each position of an
echoed prompt, and for a prompt whose first block it serves from its prefix cache; its greedy token is
transformers' argmax. Skips, with the reason, where vLLM cannot be installed."""
from __future__ import annotations

import re

import httpx
import pytest
import torch

pytest_plugins = ["servers"]  # the run's server: the vllm_base fixture
pytestmark = pytest.mark.slow

PROMPT = " the quick brown fox"
ATOL = 1e-5  # float32: the served model's own error against float64 is ~1e-6 (servers.build_base)


@pytest.fixture(scope="module")
def reference(vllm_base):
    """The served checkpoint in transformers (this project's .venv): tokenizer and a function from token ids
    to the log-softmax of its float32 logits at every position, [len(ids), vocab]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(vllm_base.model, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return AutoTokenizer.from_pretrained(vllm_base.model), logprobs


def complete(served, **body) -> dict:
    """One greedy token; top log-probs keyed `token_id:N` (keyed by text, tokens that decode alike collide)."""
    request = {"model": served.name, "max_tokens": 1, "temperature": 0, "return_tokens_as_token_ids": True,
               "return_token_ids": True, **body}
    response = httpx.post(f"{served.url}/completions", json=request, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def by_id(top: dict[str, float], vocab: int) -> torch.Tensor:
    """`{"token_id:N": logprob}` over the whole vocabulary, as a [vocab] tensor."""
    assert len(top) == vocab
    out = torch.full((vocab,), float("nan"))
    for key, value in top.items():
        out[int(key.removeprefix("token_id:"))] = value
    assert not out.isnan().any()
    return out


def prefix_cache_hits(served) -> float:
    metrics = httpx.get(f"{served.root}/metrics", timeout=30).text
    return sum(float(m) for m in re.findall(r"^vllm:prefix_cache_hits_total\{.*\} (\S+)$", metrics, re.MULTILINE))


def test_next_token_logprobs_are_transformers(vllm_base, reference):
    tok, logprobs = reference
    ids = tok(PROMPT)["input_ids"]
    want = logprobs(ids)[-1]
    choice = complete(vllm_base, prompt=ids, logprobs=vllm_base.vocab)
    torch.testing.assert_close(by_id(choice["logprobs"]["top_logprobs"][0], vllm_base.vocab), want, atol=ATOL, rtol=0)
    assert choice["token_ids"] == [int(want.argmax())]
    assert choice["logprobs"]["tokens"] == [f"token_id:{int(want.argmax())}"]


def test_echoed_prompt_logprobs_are_transformers(vllm_base, reference):
    tok, logprobs = reference
    ids = tok(PROMPT)["input_ids"]
    want = logprobs(ids)
    choice = complete(vllm_base, prompt=ids, logprobs=vllm_base.vocab, echo=True, prompt_logprobs=vllm_base.vocab)
    assert choice["prompt_token_ids"] == ids
    # prompt_logprobs: one per prompt position, the first None; {"id": {"logprob", "rank", "decoded_token"}}
    prompt = choice["prompt_logprobs"]
    assert len(prompt) == len(ids) and prompt[0] is None
    for position in range(1, len(ids)):
        got = by_id({k: v["logprob"] for k, v in prompt[position].items()}, vllm_base.vocab)
        torch.testing.assert_close(got, want[position - 1], atol=ATOL, rtol=0)
    # echo: logprobs cover the prompt's tokens (the first without any) and then the generated one
    echoed = choice["logprobs"]
    assert echoed["tokens"] == [f"token_id:{i}" for i in [*ids, int(want[-1].argmax())]]
    assert echoed["top_logprobs"][0] is None
    for position in range(1, len(ids) + 1):
        got = by_id(echoed["top_logprobs"][position], vllm_base.vocab)
        torch.testing.assert_close(got, want[position - 1], atol=ATOL, rtol=0)
    assert choice["token_ids"] == [int(want[-1].argmax())]


def test_prefix_cache_hit_answers_the_same(vllm_base, reference):
    """vLLM caches prompts by blocks of 128 tokens (on by default here): the second request for a
    200-token prompt reads its first block from the cache, and still answers transformers' log-probs."""
    tok, logprobs = reference
    ids = (tok(" the quick brown fox jumps over the lazy dog.")["input_ids"] * 30)[:200]
    want = logprobs(ids)[-1]
    first = complete(vllm_base, prompt=ids, logprobs=vllm_base.vocab)
    hits = prefix_cache_hits(vllm_base)
    second = complete(vllm_base, prompt=ids, logprobs=vllm_base.vocab)
    assert prefix_cache_hits(vllm_base) >= hits + 128
    for choice in (first, second):
        torch.testing.assert_close(by_id(choice["logprobs"]["top_logprobs"][0], vllm_base.vocab), want,
                                   atol=ATOL, rtol=0)
        assert choice["token_ids"] == [int(want.argmax())]
