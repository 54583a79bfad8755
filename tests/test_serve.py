"""The OpenAI-compatible server on a live port (127.0.0.1), driven by the official `openai` client, by
lm-eval's `local-completions` model and by a headless browser: answers equal the offline engine's,
concurrent requests share batches, bad requests get OpenAI's error JSON, a full queue a 503."""
from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from helpers import compose_app

from proxy.api import Served, create_app
from proxy.batcher import Batcher
from proxy.engine import GenerationSettings
from proxy.options import generation_settings
from proxy.serve import running as live
from proxy.serve import served_models

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [" the quick brown", " Question: where was the person born?\nAnswer:", " a b c",
             " proxy tuning steers a large model with a small", " the lazy dog", ""]


@pytest.fixture(scope="module")
def config(tiny_family):
    return compose_app("serve", f"base={tiny_family.large}", f"expert={tiny_family.expert}",
                       f"anti_expert={tiny_family.small}", "logger=none", "server.model_name=tiny-proxy",
                       "generation.max_new_tokens=24")


@pytest.fixture(scope="module")
def service(config):
    models = served_models(config)
    with live(create_app(models, generation_settings(config.generation))) as url:
        yield {"url": url, "models": {m.role: m for m in models}}
    for m in models:
        m.batcher.close()


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service['url']}/v1", api_key="unused", max_retries=0, timeout=120)


def offline(service, prompts, alpha=None, max_tokens=24, stop=()):
    """The engine's own greedy answers, as proxy.run computes them (alpha: the first pair's strength)."""
    engine = service["models"]["proxy"].batcher.engine
    pair = engine.pairs[0]
    old, pair.alpha = pair.alpha, pair.alpha if alpha is None else alpha
    try:
        gens = engine.generate(prompts, GenerationSettings(max_new_tokens=max_tokens, do_sample=False, stop=list(stop)))
    finally:
        pair.alpha = old
    return [g.text for g in gens]


def test_the_models_are_the_proxy_the_base_and_the_expert(client, models):
    listed = client.models.list().data
    roles = {m.id: m.model_extra["role"] for m in listed}
    assert roles["tiny-proxy"] == "proxy" and sorted(roles.values()) == ["base", "expert", "proxy"]
    # as vLLM lists it: the longest prompt + generation (every tiny model has the same context)
    assert {m.model_extra["max_model_len"] for m in listed} == {models["large"].config.max_position_embeddings}


def test_greedy_completions_are_what_proxy_run_writes(service, client, tiny_family, tmp_path, config):
    from proxy.run import run

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    run(compose_app("proxy", f"base={tiny_family.large}", f"expert={tiny_family.expert}",
                    f"anti_expert={tiny_family.small}", f"prompts={prompts}", "logger=none",
                    "generation.max_new_tokens=24"), str(tmp_path / "run"))
    written = [json.loads(line)["generation"] for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    answer = client.completions.create(model="tiny-proxy", prompt=QUESTIONS, max_tokens=24, temperature=0)
    assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == written
    assert answer.usage.completion_tokens > 0
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tiny-proxy", prompt=QUESTIONS[1], max_tokens=24, temperature=0, stream=True))
    assert streamed == written[1]


def test_alpha_steers_per_request_and_the_base_is_alpha_zero(service, client):
    base_name = service["models"]["base"].name
    for alpha in (0.0, 1.7):
        got = client.completions.create(model="tiny-proxy", prompt=QUESTIONS[0], max_tokens=16, temperature=0,
                                        extra_body={"alpha": alpha}).choices[0].text
        assert got == offline(service, QUESTIONS[:1], alpha=alpha, max_tokens=16)[0]
    alone = client.completions.create(model=base_name, prompt=QUESTIONS[0], max_tokens=16, temperature=0)
    assert alone.choices[0].text == offline(service, QUESTIONS[:1], alpha=0.0, max_tokens=16)[0]


def test_chat_completions_plain_and_streamed(service, client):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    reply = client.chat.completions.create(model="tiny-proxy", messages=messages, max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and text == offline(service, QUESTIONS[1:2], max_tokens=16)[0]
    chunks = list(client.chat.completions.create(model="tiny-proxy", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_seed_logprobs_and_diagnostics(service, client):
    free = offline(service, QUESTIONS[:1], max_tokens=24)[0]
    stop = free[4:6]
    cut = client.completions.create(model="tiny-proxy", prompt=QUESTIONS[0], max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="tiny-proxy", prompt=QUESTIONS[0], max_tokens=12, temperature=0.9,
                                         top_p=0.95, seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    with_lp = client.completions.create(model="tiny-proxy", prompt=QUESTIONS[0], max_tokens=6, temperature=0,
                                        logprobs=2, extra_body={"diagnostics": True})
    lp = with_lp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
    # OpenAI's completion form keys the alternatives by text: two byte tokens that both print as '\ufffd' are one
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(max(t.values()) >= v for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    diagnostics = with_lp.choices[0].model_extra["diagnostics"]
    assert all(d["kl"] >= 0 and isinstance(d["changed"], bool) for d in diagnostics)


@pytest.mark.parametrize("body, fragment", [
    ({"model": "nope", "prompt": "x"}, "unknown model 'nope'"),
    ({"model": "tiny-proxy", "prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"model": "tiny-proxy", "prompt": "x", "alpha": "abc"}, "alpha must be a number"),
    ({"model": "tiny-proxy", "prompt": "x", "alpha": "nan"}, "alpha must be a finite number"),
    ({"model": "tiny-proxy", "prompt": " the" * 300}, "exceeds the model's context"),
    ({"model": "tiny-proxy"}, "prompt"),
    ({"model": "tiny-proxy", "prompt": "x", "temperature": 0.7, "top_p": 1.5}, "top_p"),
    ({"model": "tiny-proxy", "prompt": "x", "logprobs": 10**6}, "which is greater than max allowed: "),
    ({"model": "tiny-proxy", "prompt": "x", "logprobs": -2}, "logprobs must be 0 or more"),
    ({"model": "tiny-proxy", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "this server reads text only"),
    ({"model": "tiny-proxy", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs needs logprobs: true"),
])
def test_bad_requests_get_one_sentence_and_the_server_keeps_serving(service, body, fragment):
    route = "chat/completions" if "messages" in body else "completions"
    answer = httpx.post(f"{service['url']}/v1/{route}", json=body, timeout=60)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    ok = httpx.post(f"{service['url']}/v1/completions", json={"model": "tiny-proxy", "prompt": "x", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200


def test_wrong_routes_and_malformed_json_get_openai_s_error_form(service):
    url = service["url"]
    missing = httpx.get(f"{url}/v1/engines", timeout=30)
    assert missing.status_code == 404 and "/v1/completions" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{url}/v1/completions", timeout=30)
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]
    broken = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny-proxy", "prompt": ',
                        headers={"Content-Type": "application/json"}, timeout=30)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_openai_clients_options_text_parts_usage_chat_logprobs_and_offsets(service, client):
    plain = [{"role": "user", "content": QUESTIONS[1]}]
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[1][:10]},
                                          {"type": "text", "text": QUESTIONS[1][10:]}]}]
    replies = [client.chat.completions.create(model="tiny-proxy", messages=m, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3) for m in (plain, parts)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    content = replies[0].choices[0].logprobs.content
    assert "".join(t.token for t in content) == replies[0].choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 and bytes(t.bytes).decode() == t.token for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)

    chunks = list(client.chat.completions.create(model="tiny-proxy", messages=plain, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == replies[0].usage.completion_tokens

    kwargs = dict(model="tiny-proxy", prompt=QUESTIONS[0], max_tokens=10, temperature=0, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    streamed = [c for c in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})]
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.text_offset and whole.text_offset[0] == 0
    assert streamed[-1].usage.completion_tokens == len(whole.tokens)


def test_echo_logprobs_follow_the_strength_and_unseeded_samples_differ(service, client):
    def echoed(model, alpha=None):
        extra = {} if alpha is None else {"alpha": alpha}
        return client.completions.create(model=model, prompt=QUESTIONS[1], max_tokens=1, temperature=0, echo=True,
                                         logprobs=0, extra_body=extra).choices[0].logprobs.token_logprobs
    base = echoed(service["models"]["base"].name)
    assert echoed("tiny-proxy", alpha=0.0) == pytest.approx(base, abs=1e-4)
    assert echoed("tiny-proxy", alpha=1.7) != pytest.approx(base, abs=1e-4)
    samples = {client.completions.create(model="tiny-proxy", prompt=QUESTIONS[0], max_tokens=12,
                                         temperature=1.5).choices[0].text for _ in range(4)}
    assert len(samples) > 1


def token_ids(names) -> list[int]:
    """vLLM's return_tokens_as_token_ids names ("token_id:N") as ids; fails on any other form."""
    out = []
    for name in names:
        kind, _, number = name.partition(":")
        assert kind == "token_id" and number.isdigit(), name
        out.append(int(number))
    return out


def by_id(top: dict[str, float]) -> dict[int, float]:
    return dict(zip(token_ids(top), top.values()))


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a model's own logits at every position of ids (L, V): one plain transformers forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def completion(service, **body) -> dict:
    answer = httpx.post(f"{service['url']}/v1/completions", json={"temperature": 0, **body}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_base_alone_gives_every_next_token_log_probability_by_token_id(service, models):
    """What a client steering this server's base reads at each step (vLLM's dialect): for a token-id prompt,
    with logprobs = the vocabulary and return_tokens_as_token_ids, every id's log-probability is log_softmax
    of the base's own logits. By text, tokens that print alike fold into one key; by id, none do."""
    base, vocab = service["models"]["base"].name, service["models"]["base"].batcher.engine.vocab_size
    ids = models["tok"](QUESTIONS[1])["input_ids"]
    want = own_logprobs(models["large"], ids)[-1]
    assert want.shape == (vocab,)
    for count in (vocab, -1):  # -1: all of it, as vLLM
        lp = completion(service, model=base, prompt=ids, max_tokens=1, logprobs=count,
                        return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
        (top,) = lp["top_logprobs"]
        got = by_id(top)
        assert sorted(got) == list(range(vocab))
        assert (torch.tensor([got[i] for i in range(vocab)]) - want).abs().max() < 1e-5
        (chosen,) = token_ids(lp["tokens"])
        assert chosen == int(want.argmax()) and abs(lp["token_logprobs"][0] - float(want[chosen])) < 1e-5
    by_text = completion(service, model=base, prompt=ids, max_tokens=1, logprobs=vocab)["choices"][0]["logprobs"]
    assert len(by_text["top_logprobs"][0]) < vocab


def test_an_echoed_token_id_prompt_carries_the_top_k_of_every_position(service, models):
    """vLLM's echo with logprobs k (what a speculative client sends to check its drafts): every prompt
    position but the first holds its own token and the k likeliest, each at log_softmax of the base's
    logits there; with max_tokens 0 the prompt alone comes back. The proxy model's echo has as its likeliest
    the top token of ProxyEngine.score_tokens at the request's strength."""
    base, vocab = service["models"]["base"].name, service["models"]["base"].batcher.engine.vocab_size
    ids = models["tok"](QUESTIONS[1])["input_ids"]
    for k, max_tokens in ((vocab, 1), (3, 0), (0, 2)):
        choice = completion(service, model=base, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=k,
                            return_tokens_as_token_ids=True)["choices"][0]
        lp = choice["logprobs"]
        seq = token_ids(lp["tokens"])  # the prompt, then what was generated
        assert len(seq) == len(lp["top_logprobs"]) == len(ids) + max_tokens and seq[: len(ids)] == ids
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = own_logprobs(models["large"], seq)  # position i - 1 predicts token i
        for i in range(1, len(seq)):
            got = by_id(lp["top_logprobs"][i])
            assert next(iter(got)) == seq[i]  # vLLM's order: the position's own token, then the best
            assert set(got) == {*want[i - 1].topk(k).indices.tolist(), seq[i]}
            assert max(abs(v - float(want[i - 1, j])) for j, v in got.items()) < 1e-5
            assert abs(lp["token_logprobs"][i] - float(want[i - 1, seq[i]])) < 1e-5
        if max_tokens == 0:
            assert choice["text"] == models["tok"].decode(ids)

    engine = service["models"]["proxy"].batcher.engine
    (scored,) = engine.score_tokens([(None, ids[:1], ids[1:])], alpha=1.7)
    echoed = completion(service, model="tiny-proxy", prompt=ids, max_tokens=1, echo=True, logprobs=2, alpha=1.7,
                        return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
    heads = [max(by_id(top).items(), key=lambda kv: kv[1]) for top in echoed["top_logprobs"][1: len(ids)]]
    assert [i for i, _ in heads] == scored["top_ids"]
    assert [v for _, v in heads] == pytest.approx(scored["top_logprobs"], abs=1e-5)


def test_logprobs_beyond_the_vocabulary_are_refused_with_the_limit(service, client):
    vocab = service["models"]["base"].batcher.engine.vocab_size
    asks = [("completions", {"prompt": [1, 2, 3], "logprobs": vocab + 1}, "logprobs"),
            ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                  "top_logprobs": vocab + 1}, "top_logprobs")]
    for route, body, param in asks:
        answer = httpx.post(f"{service['url']}/v1/{route}", json={"model": "tiny-proxy", **body}, timeout=60)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == param
        assert error["message"].startswith(f"Requested sample logprobs of {vocab + 1}, which is greater than max "
                                           f"allowed: {vocab} (the model's vocabulary")
    with pytest.raises(openai.BadRequestError, match=f"greater than max allowed: {vocab}"):
        client.completions.create(model="tiny-proxy", prompt="x", max_tokens=1, logprobs=vocab + 1)


def test_the_openai_client_reads_token_id_answers_plain_streamed_and_chat(service, client, models):
    """return_tokens_as_token_ids through the official client: the echoed and generated ids are the prompt's
    and the base's greedy ones, streamed as whole; chat's tokens and alternatives are ids too."""
    base, vocab = service["models"]["base"].name, service["models"]["base"].batcher.engine.vocab_size
    ids = models["tok"](QUESTIONS[0])["input_ids"]
    engine = service["models"]["proxy"].batcher.engine
    pair = engine.pairs[0]
    old, pair.alpha = pair.alpha, 0.0
    try:
        (greedy,) = engine.generate([QUESTIONS[0]], GenerationSettings(max_new_tokens=6, stop=[]), prompt_ids=[ids])
    finally:
        pair.alpha = old
    ask = dict(model=base, prompt=ids, max_tokens=6, temperature=0, logprobs=vocab, stop=[],
               extra_body={"return_tokens_as_token_ids": True})
    lp = client.completions.create(**ask, echo=True).choices[0].logprobs
    generated = token_ids(lp.tokens)[len(ids):]
    assert token_ids(lp.tokens)[: len(ids)] == ids and generated[: len(greedy.token_ids)] == greedy.token_ids
    assert all(len(by_id(top)) == vocab for top in lp.top_logprobs[1:])
    chunks = [c.choices[0].logprobs for c in client.completions.create(**ask, stream=True) if c.choices[0].logprobs]
    assert [i for c in chunks for i in token_ids(c.tokens)] == generated

    reply = client.chat.completions.create(model="tiny-proxy", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=4,
                                           extra_body={"return_tokens_as_token_ids": True})
    content = reply.choices[0].logprobs.content
    assert models["tok"].decode(token_ids(t.token for t in content)) == reply.choices[0].message.content
    assert all(len(token_ids(a.token for a in t.top_logprobs)) == 4 for t in content)
    assert b"".join(bytes(t.bytes) for t in content).decode() == reply.choices[0].message.content


def test_plausibility_serves_strict_json_and_the_engine_s_answers(tiny_family):
    """proxy.plausibility: greedy answers are the engine's; generated tokens' alternatives put the plausible
    tokens first and the ruled-out ones far below (probability 0, finite scores); the echoed prompt is
    scored under the paper's law; nothing in the JSON is Infinity or NaN."""
    from proxy.combine import RULED_OUT

    config = compose_app("serve", f"base={tiny_family.large}", f"expert={tiny_family.expert}",
                         f"anti_expert={tiny_family.small}", "logger=none", "server.model_name=tiny-proxy",
                         "generation.max_new_tokens=12", "proxy.plausibility=0.5")
    models = served_models(config)
    try:
        with live(create_app(models, generation_settings(config.generation))) as url:
            raw = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": "tiny-proxy", "prompt": QUESTIONS[:2], "max_tokens": 12, "temperature": 0, "echo": True,
                "logprobs": 5}).text
        answer = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in the response"))
        engine = models[0].batcher.engine
        assert engine.plausibility == 0.5
        want = engine.generate(QUESTIONS[:2], GenerationSettings(max_new_tokens=12))
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == [q + g.text for q, g in zip(QUESTIONS, want)]
        echoed = [lp for c in choices for lp in c["logprobs"]["token_logprobs"][:-12] if lp is not None]
        assert echoed and all(-RULED_OUT / 2 < lp <= 0 for lp in echoed)
        generated = [top for c, g in zip(choices, want) for top in c["logprobs"]["top_logprobs"][-len(g.token_ids):]]
        assert generated and all(len(top) <= 5 for top in generated)
        assert any(v < -RULED_OUT / 2 for top in generated for v in top.values())  # fewer than 5 were plausible
    finally:
        for m in models:
            m.batcher.close()


def test_sixteen_clients_share_batches_and_every_greedy_answer_is_the_engine_s(service, client):
    """16 concurrent clients x 8 requests: other prompts, strengths and budgets in one running batch."""
    cases = [(QUESTIONS[i % 5], [None, 0.5, 1.5][i % 3], 8 + 4 * (i % 4)) for i in range(16 * 8)]
    want = {case: offline(service, [case[0]], alpha=case[1], max_tokens=case[2])[0] for case in set(cases)}
    batcher = service["models"]["proxy"].batcher

    def ask(case):
        prompt, alpha, max_tokens = case
        extra = {} if alpha is None else {"alpha": alpha}
        return client.completions.create(model="tiny-proxy", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_body=extra).choices[0].text

    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(ask, cases))
    assert len(got) == len(cases)
    assert [g == want[c] for g, c in zip(got, cases)] == [True] * len(cases)
    assert batcher.live.peak_rows > 1


def test_a_client_that_disconnects_frees_its_row(service):
    batcher = service["models"]["proxy"].batcher
    body = {"model": "tiny-proxy", "prompt": QUESTIONS[0], "max_tokens": 200, "temperature": 0, "stream": True,
            "stop": []}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{service['url']}/v1/completions", json=body) as answer:
        next(answer.iter_lines())
    deadline = time.monotonic() + 20
    while batcher.live.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batcher.live.rows


def test_a_full_queue_answers_503_and_never_hangs(service, config):
    engine = service["models"]["proxy"].batcher.engine
    small = Batcher(engine, max_batch=1, max_queue=1)
    app = create_app([Served("tiny-proxy", "proxy", small)], generation_settings(config.generation))
    body = {"model": "tiny-proxy", "prompt": QUESTIONS[0], "max_tokens": 48, "temperature": 0, "stop": []}
    try:
        with live(app) as url, ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120), range(6)))
    finally:
        small.close()
    codes = sorted(a.status_code for a in answers)
    assert 503 in codes and 200 in codes
    busy = next(a for a in answers if a.status_code == 503).json()["error"]
    assert "busy" in busy["message"]


@pytest.mark.slow
def test_lm_eval_local_completions_gives_the_proxy_model_s_answers(service, tiny_family):
    """lm-eval's own OpenAI-protocol client against the server: its answers are the `proxy` model type's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import eval.lm_eval_proxy  # noqa: F401  registers "proxy"

    tasks = ["proxy_tiny_gen", "proxy_tiny_mc"]
    manager = TaskManager(include_path=str(ROOT / "tests" / "fixtures" / "lm_eval"), include_defaults=False)
    common = dict(tasks=tasks, log_samples=True, bootstrap_iters=0, task_manager=manager)
    remote = lm_eval.simple_evaluate(
        model="local-completions", model_args=f"model=tiny-proxy,base_url={service['url']}/v1/completions,"
        f"tokenizer_backend=huggingface,tokenizer={tiny_family.large},num_concurrent=4,max_retries=1", **common)
    local = lm_eval.simple_evaluate(
        model="proxy", model_args=f"base={tiny_family.large},expert={tiny_family.expert},"
        f"anti_expert={tiny_family.small},alpha=1.0", **common)
    for task in tasks:
        got = [s["resps"] for s in remote["samples"][task]]
        want = [s["resps"] for s in local["samples"][task]]
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            for (a,), (b,) in zip(g, w):
                if isinstance(b, str):
                    assert a == b
                else:
                    assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-4) and bool(a[1]) == bool(b[1])


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_the_page_shows_each_proxy_token_coloured_by_what_the_expert_changed(service, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(f"{service['url']}/?run=1&alpha=1.5&prompt=" + httpx.QueryParams({"p": QUESTIONS[1]})["p"])
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#out-proxy .done")
                                        and d.find_elements(By.CSS_SELECTOR, "#out-base .done"))
        tokens = driver.find_elements(By.CSS_SELECTOR, "#out-proxy .tok")
        assert tokens and all("base would say" in t.get_attribute("title") for t in tokens)
        assert any("rgba(230, 126, 34" in t.get_attribute("style") for t in tokens)
        assert driver.find_elements(By.CSS_SELECTOR, "#out-base .tok")
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


def test_the_server_refuses_what_it_cannot_batch_in_one_line(tiny_family):
    from helpers import assert_one_error_line, run_in_process

    args = [f"base={tiny_family.large}", f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
            "logger=none"]
    result = run_in_process("serve", lambda cfg, _: served_models(cfg), *args, "proxy.speculative.k=4")
    assert_one_error_line(*result, "drop proxy.speculative.k")


@pytest.mark.slow
def test_the_command_line_serves_until_stopped(tiny_family, tmp_path):
    """`python -m proxy.serve ...` in its own process: it answers, then stops on SIGTERM (uvicorn shuts down
    gracefully, then lets the signal end the process)."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "proxy.serve", f"base={tiny_family.large}",
                             f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}", "logger=none",
                             f"server.port={port}", "server.log_level=warning", f"paths.outputs={tmp_path}"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        url, answer = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + 120
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(f"{url}/v1/completions", timeout=30,
                                    json={"model": "small", "prompt": "x", "max_tokens": 2})
            except httpx.HTTPError:
                time.sleep(0.3)
        assert answer is not None and answer.status_code == 400  # "small" is no served model's name
        names = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert names == ["large+expert", "large", "expert"]
        ok = httpx.post(f"{url}/v1/completions", json={"model": names[0], "prompt": "x", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "serving large+expert" in proc.stdout.read()
