"""A base named by URL (proxy/remote.py), steered through a real server: this project's proxy.serve, whose
base-alone model answers token-id, top-K and echo requests as vLLM does (tests/test_remote_vllm.py holds
the same invariants against vLLM itself). Where K covers the vocabulary, greedy output is the local
engine's on the same weights, token for token; faults get bounded retries, then one line."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import torch
from helpers import SERVED_PROMPTS as PROMPTS
from helpers import (
    assert_served_gives_the_local_tokens,
    compose_app,
    steering,
    token_ids,
)

from core.errors import UserError
from core.loading import load_model, load_tokenizer
from core.registry import display_name
from proxy.api import create_app
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from proxy.options import generation_settings
from proxy.remote import OUTSIDE, RemoteBase
from proxy.serve import running, served_models
from proxy.speculative import SpeculativeProxyEngine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_family):
    """proxy.serve over the tiny family: its base-alone model (alpha 0) is the base the tests steer."""
    cfg = compose_app("serve", f"base={tiny_family.large}", f"expert={tiny_family.expert}",
                      f"anti_expert={tiny_family.small}", "logger=none", "server.model_name=tiny-proxy")
    models = served_models(cfg)
    app = create_app(models, generation_settings(cfg.generation))
    with running(app) as url:
        yield {"url": f"{url}/v1", "base": display_name(tiny_family.large)}
    for m in models:
        m.batcher.close()


@pytest.fixture(scope="module")
def local(tiny_family):
    tok = load_tokenizer(tiny_family.large)
    return {"tok": tok, "large": load_model(tiny_family.large), "expert": load_model(tiny_family.expert),
            "small": load_model(tiny_family.small)}


def served(server, local, **kw) -> RemoteBase:
    return RemoteBase(server["url"], local["tok"], model=server["base"], **kw)


def test_the_served_base_reads_the_whole_vocabulary_and_the_same_log_probabilities(server, local):
    base = served(server, local)
    assert base.top_logprobs == base.vocab_size == len(local["tok"])  # the most this server gives
    assert base.config.max_position_embeddings == local["large"].config.max_position_embeddings
    ids_ = local["tok"](PROMPTS[1])["input_ids"]
    got = base.next_logprobs([ids_], last=3)[0]  # an echo: the laws after the last three tokens
    with torch.no_grad():
        want = torch.log_softmax(local["large"](torch.tensor([ids_])).logits[0, -3:].float(), -1)
    assert torch.allclose(got, want[:, : got.shape[-1]], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("k", [None, 3], ids=["plain", "speculative"])
def test_greedy_output_is_the_local_engine_s_token_for_token(server, local, k):
    assert_served_gives_the_local_tokens(served(server, local), local["large"], local, k, max_new_tokens=10)


@pytest.mark.parametrize("outside", ["spread", "zero"])
def test_top_k_keeps_plain_and_speculative_rounds_alike_and_counts_requests(server, local, outside):
    base = served(server, local, top_logprobs=5, outside=outside)
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    # a drafter close to the proxy (the large model drafts for base + (large - small)) gets drafts accepted
    pair = [SteeringPair(local["large"], local["small"], 1.0)]
    plain = ProxyEngine(base, local["tok"], pair)
    spec = SpeculativeProxyEngine(base, local["tok"], pair, k=4)
    assert token_ids(plain.generate(PROMPTS, settings)) == token_ids(spec.generate(PROMPTS, settings))
    assert spec.last_stats.accepted > 0
    assert spec.last_stats.requests_per_token < plain.last_stats.requests_per_token == 1.0
    ids_ = local["tok"](PROMPTS[0])["input_ids"]
    lp = base.next_logprobs([ids_])[0, 0]
    with torch.no_grad():
        law = torch.log_softmax(local["large"](torch.tensor([ids_])).logits[0, -1].float(), -1)[: len(lp)]
    top = law.topk(5).indices
    assert torch.allclose(lp[top], law[top], atol=1e-5)  # the base's own top 5
    rest = torch.ones_like(lp, dtype=torch.bool)
    rest[top] = False
    if outside == "zero":  # every other token has probability 0
        assert bool((lp[rest] == OUTSIDE).all())
    else:  # the probability the base left to them, shared evenly: the row is a law again
        assert float(lp[rest].max() - lp[rest].min()) == 0.0
        assert float(torch.logsumexp(lp, -1)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(UserError, match=r"load.base.outside \(lm-eval: base_outside\) must be spread or zero"):
        served(server, local, outside="uniform")


def test_a_given_text_is_scored_only_with_the_whole_distribution(server, local):
    full = steering(served(server, local), local, 1.0)
    ctx = local["tok"](" the quick")["input_ids"]
    cont = local["tok"](" brown", add_special_tokens=False)["input_ids"]
    want = steering(local["large"], local, 1.0).score_tokens([(None, ctx, cont)])[0]["logprob"]
    assert full.score_tokens([(None, ctx, cont)])[0]["logprob"] == pytest.approx(want, abs=1e-4)
    with pytest.raises(UserError, match="whole distribution"):
        steering(served(server, local, top_logprobs=5), local, 1.0).score_tokens([(None, ctx, cont)])


def test_the_served_model_and_the_tokenizer_are_checked(server, local, tiny_family):
    with pytest.raises(UserError, match=r"serves \d models \(tiny-proxy, large.*load.base.model=<id>"):
        RemoteBase(server["url"], local["tok"])
    with pytest.raises(UserError, match="does not serve 'nope'"):
        RemoteBase(server["url"], local["tok"], model="nope")
    with pytest.raises(UserError, match="tokenizes a probe text differently"):
        RemoteBase(server["url"], load_tokenizer(tiny_family.foreign), model=server["base"])
    for wrong in (0, 1.5, "x", True):
        with pytest.raises(UserError, match=r"top_logprobs \(lm-eval: base_top_logprobs\) must be a whole number"):
            served(server, local, top_logprobs=wrong)
    with pytest.raises(UserError, match="top_logprobs must be between 1 and the vocabulary"):
        served(server, local, top_logprobs=10**6)
    for option, wrong in (("timeout", "abc"), ("timeout", 0), ("retries", -1), ("retries", "x")):
        with pytest.raises(UserError, match=f"load.base.{option} "):
            served(server, local, **{option: wrong})


# ---------------------------------------------------------------------------- faults

class Faults:
    """A reverse proxy in front of the real server: the next requests to /v1/completions get the faults
    queued here (a status, a body that is not JSON, a pause), then the real answers; it keeps the headers."""

    def __init__(self, upstream: str):
        self.upstream, self.queue, self.headers, self.lock = upstream, [], [], threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        status, content = await self.answer(scope, body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})

    async def answer(self, scope, body: bytes) -> tuple[int, bytes]:
        import asyncio

        import httpx

        fault = None
        if scope["path"].endswith("/completions"):
            self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
            with self.lock:
                fault = self.queue.pop(0) if self.queue else None
        if fault is not None and fault[0] == "status":
            return fault[1], b'{"error": {"message": "busy"}}'
        if fault is not None and fault[0] == "garbage":
            return 200, b"<html>bad gateway</html>"
        if fault is not None and fault[0] == "pause":
            await asyncio.sleep(fault[1])
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.request(scope["method"], self.upstream + scope["path"], content=body,
                                          headers={"content-type": "application/json"})
        return response.status_code, response.content


@pytest.fixture(scope="module")
def flaky(server):
    faults = Faults(server["url"].removesuffix("/v1"))
    with running(faults) as url:
        yield {"url": f"{url}/v1", "faults": faults}


def test_busy_and_failing_answers_are_retried_then_reported_in_one_line(flaky, server, local):
    base = RemoteBase(flaky["url"], local["tok"], model=server["base"], retries=3)
    base.client.backoff = 0.01
    row = [local["tok"](PROMPTS[0])["input_ids"]]
    want = base.next_logprobs(row)
    flaky["faults"].queue += [("status", 429), ("status", 503), ("garbage", 200)]
    assert torch.equal(base.next_logprobs(row), want)  # three faults, then the answer
    flaky["faults"].queue += [("status", 500)] * 4
    with pytest.raises(UserError) as err:
        base.next_logprobs(row)
    message = str(err.value)
    assert flaky["url"] in message and "500 busy" in message and "after 4 tries" in message
    assert "\n" not in message


def test_a_slow_server_times_out_and_a_down_one_is_named(flaky, server, local):
    base = RemoteBase(flaky["url"], local["tok"], model=server["base"], retries=0, timeout=0.5)
    flaky["faults"].queue.append(("pause", 2.0))
    with pytest.raises(UserError, match="ReadTimeout"):
        base.next_logprobs([local["tok"](PROMPTS[0])["input_ids"]])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserError, match=f"127.0.0.1:{port}/v1/models gave no answer"):
        RemoteBase(f"http://127.0.0.1:{port}/v1", local["tok"], retries=1)


def test_a_dropped_connection_is_retried_then_named(local):
    """A server that accepts the connection and closes it without a word (a crashed worker, a proxy's reset)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port, dropped = listener.getsockname()[1], []

    def drop_all():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            dropped.append(conn.recv(65536)[:20])
            conn.close()

    threading.Thread(target=drop_all, daemon=True).start()
    try:
        with pytest.raises(UserError) as err:
            RemoteBase(f"http://127.0.0.1:{port}/v1", local["tok"], retries=2)
    finally:
        listener.close()
    assert len(dropped) == 3  # the first try and two retries
    message = str(err.value)
    assert f"127.0.0.1:{port}/v1/models gave no answer" in message and "after 3 tries" in message
    assert "\n" not in message


def test_the_key_goes_in_a_header_and_never_in_a_message(flaky, server, local, monkeypatch):
    secret = "sk-test-" + "x" * 24
    monkeypatch.setenv("PROXY_TEST_KEY", secret)
    base = RemoteBase(flaky["url"], local["tok"], model=server["base"], api_key_env="PROXY_TEST_KEY", retries=0)
    assert flaky["faults"].headers[-1]["authorization"] == f"Bearer {secret}"
    flaky["faults"].queue.append(("status", 503))
    with pytest.raises(UserError) as err:
        base.next_logprobs([local["tok"](PROMPTS[0])["input_ids"]])
    assert secret not in str(err.value) and secret not in repr(base)
    with pytest.raises(UserError, match="names no set environment variable"):
        RemoteBase(flaky["url"], local["tok"], model=server["base"], api_key_env="PROXY_UNSET_KEY_NAME")


# ---------------------------------------------------------------------------- the entry points, base=URL

def url_args(server) -> list[str]:
    return [f"base={server['url']}", f"load.base.model={server['base']}"]


def test_proxy_run_and_eval_run_take_a_base_by_url(server, tiny_family, tmp_path):
    """The same command lines with base=http://... give what the loaded base gives."""
    from helpers import FIXTURES, run_in_process

    from eval.run import evaluate
    from proxy.run import run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p.strip()}"}}\n' for p in PROMPTS[::2]))
    pair = [f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}", "logger=none"]
    args = [*pair, f"prompts={prompts}", "generation.max_new_tokens=8"]
    assert run_in_process("proxy", run, f"base={tiny_family.large}", *args, out_dir=str(tmp_path / "local"))[0] == 0
    code, err = run_in_process("proxy", run, *url_args(server), *args, "proxy.speculative.k=2",
                               out_dir=str(tmp_path / "served"))
    assert code == 0, err
    served_out, local_out = (tmp_path / d / "generations.jsonl" for d in ("served", "local"))
    assert served_out.read_text() == local_out.read_text()
    task = ["+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}", "generation.max_new_tokens=6", *pair]
    local = evaluate(compose_app("eval", f"base={tiny_family.large}", *task), out_dir=str(tmp_path / "eval-local"))
    remote = evaluate(compose_app("eval", *url_args(server), *task), out_dir=str(tmp_path / "eval-served"))
    assert remote["metrics"]["exact_match"] == local["metrics"]["exact_match"]
    assert remote["variant"] == "served" and remote["model"] == server["base"]
    assert remote["metrics"]["requests_per_token"] > 0
    code, err = run_in_process("proxy", run, f"base={tiny_family.large}", "load.base.top_logprobs=5", *args,
                               out_dir=str(tmp_path / "wrong"))
    assert code == 2 and "load.base.top_logprobs is for a served base" in err


def test_lm_eval_generates_through_a_served_base_and_refuses_loglikelihood_on_top_k(server, tiny_family):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import eval.lm_eval_proxy  # noqa: F401  registers "proxy"
    from eval.lm_eval_proxy import ProxyLM

    tasks = TaskManager(include_path=str(ROOT / "tests" / "fixtures" / "lm_eval"), include_defaults=False)
    common = f"expert={tiny_family.expert},anti_expert={tiny_family.small},alpha=1.0,max_length=48"

    def run(base: str):
        return lm_eval.simple_evaluate(model="proxy", model_args=f"{base},{common}", tasks=["proxy_tiny_gen"],
                                       log_samples=True, batch_size=4, bootstrap_iters=0, task_manager=tasks)

    def generations(results):
        return [s["resps"] for s in results["samples"]["proxy_tiny_gen"]]

    served_args = f"base={server['url']},base_model={server['base']}"
    assert generations(run(served_args)) == generations(run(f"base={tiny_family.large}"))
    lm = ProxyLM(base=server["url"], base_model=server["base"], base_top_logprobs=5, expert=tiny_family.expert,
                 anti_expert=tiny_family.small)
    with pytest.raises(UserError, match="whole distribution"):
        lm.loglikelihood([lm_eval.api.instance.Instance("loglikelihood", {}, ("the quick", " brown"), 0)])


def test_proxy_serve_steers_a_base_served_elsewhere(server, tiny_family, local):
    """proxy.serve with base=http://...: the proxy-tuned model served from a machine that holds only the pair."""
    openai = pytest.importorskip("openai")
    cfg = compose_app("serve", *url_args(server), f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                      "logger=none", "server.model_name=chained")
    models = served_models(cfg)
    try:
        with running(create_app(models, generation_settings(cfg.generation))) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            got = [client.completions.create(model="chained", prompt=p, max_tokens=8, temperature=0).choices[0].text
                   for p in PROMPTS]
    finally:
        for m in models:
            m.batcher.close()
    settings = GenerationSettings(max_new_tokens=8)
    want = [g.text for g in steering(local["large"], local, 1.0).generate(PROMPTS, settings)]
    assert got == want


def test_a_pair_of_another_tokenizer_steers_a_served_base_as_it_steers_the_loaded_one(server, local, tiny_family):
    """proxy.cross over a base read through the server: the same tokens as over the same base loaded here."""
    import copy

    anti, tok = load_model(tiny_family.foreign), load_tokenizer(tiny_family.foreign)
    expert = copy.deepcopy(anti)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in expert.parameters():
            param.add_(0.05 * torch.randn_like(param))
    settings = GenerationSettings(max_new_tokens=12, batch_size=4)
    here = ProxyEngine(local["large"], local["tok"], [SteeringPair(expert, anti, 1.0, tokenizer=tok, anti_tokenizer=tok)])
    there = ProxyEngine(served(server, local), local["tok"],
                        [SteeringPair(expert, anti, 1.0, tokenizer=tok, anti_tokenizer=tok)])
    assert here.bridges and there.bridges
    want = token_ids(here.generate(PROMPTS, settings))
    assert want != token_ids(ProxyEngine(local["large"], local["tok"]).generate(PROMPTS, settings))  # it steers
    assert token_ids(there.generate(PROMPTS, settings)) == want
