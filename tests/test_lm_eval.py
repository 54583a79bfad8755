"""The `proxy` lm-eval model type on local JSONL tasks (tests/fixtures/lm_eval): at alpha 0 it gives lm-eval's
own `hf` model's numbers, request for request, on a BPE tokenizer with BOS and on a word-level one; steered,
it answers with the engine's own scores and generations."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

import eval.lm_eval_proxy  # noqa: E402,F401  registers "proxy"
from eval.lm_eval_cli import named  # noqa: E402
from eval.lm_eval_proxy import ProxyLM  # noqa: E402
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["proxy_tiny_mc", "proxy_tiny_gen", "proxy_tiny_ppl"]
MAX_LENGTH = 48  # below the longest perplexity text, so rolling windows are exercised


def evaluate(model: str, model_args: str, tasks=TASKS):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True, batch_size=4,
                                   bootstrap_iters=0, task_manager=TaskManager(include_path=str(TASKS_DIR),
                                                                               include_defaults=False))


def proxy_args(base, expert, anti, alpha):
    return f"base={base},expert={expert},anti_expert={anti},alpha={alpha},max_length={MAX_LENGTH}"


def answers(results, task) -> list[tuple[tuple, object]]:
    """[(request arguments, answer)] over every request lm-eval made for the task, in order."""
    pairs = []
    for sample in results["samples"][task]:
        pairs += [(tuple(a), r[0]) for a, r in zip(sample["arguments"], sample["resps"])]
    return pairs


def assert_same_answers(got, want):
    for task in TASKS:
        g, w = answers(got, task), answers(want, task)
        assert [a for a, _ in g] == [a for a, _ in w] and g, task
        for (args, x), (_, y) in zip(g, w):
            if isinstance(y, str):
                assert x == y, (task, args)
            elif isinstance(y, float):
                assert float(x) == pytest.approx(y, abs=1e-5), (task, args)
            else:  # (log-likelihood, is greedy)
                assert float(x[0]) == pytest.approx(float(y[0]), abs=1e-5) and bool(x[1]) == bool(y[1]), (task, args)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama2", "wordlevel"])
def test_alpha_zero_gives_the_hf_model_s_numbers(zoo, family):
    """Trailing spaces, an empty context, rolling windows past max_length, stop strings: all as `hf` does."""
    f = zoo[family]
    want = evaluate("hf", f"pretrained={f.base},dtype=float32,device=cpu,max_length={MAX_LENGTH}")
    got = evaluate("proxy", proxy_args(f.base, f.expert, f.anti, 0.0))
    assert_same_answers(got, want)
    contexts = [a[0] for a, _ in answers(got, "proxy_tiny_mc")]
    assert "" in contexts and any(c.endswith(" ") for c in contexts)


@pytest.fixture(scope="module")
def steered(tiny_family):
    return evaluate("proxy", proxy_args(tiny_family.large, tiny_family.expert, tiny_family.small, 1.0))


def proxy_engine(models, alpha):
    return ProxyEngine(models["large"], models["tok"], [SteeringPair(models["expert"], models["small"], alpha)])


def test_every_task_runs_and_reports_its_metric(steered):
    res = steered["results"]
    assert 0.0 <= res["proxy_tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in res["proxy_tiny_gen"]
    assert res["proxy_tiny_ppl"]["word_perplexity,none"] > 1.0


def test_loglikelihood_is_the_engine_score_of_lm_eval_s_tokens(steered, models):
    lm = ProxyLM(engine=proxy_engine(models, 1.0), max_length=MAX_LENGTH)
    pairs = answers(steered, "proxy_tiny_mc")
    assert len(pairs) == 14  # 3 + 2 + 3 + 2 + 2 + 2 choices
    for (context, continuation), (logprob, greedy) in pairs:
        ctx, cont = lm._encode_pair(context, continuation) if context else ([lm.prefix_token_id], lm.tok_encode(
            continuation, add_special_tokens=False))
        want = lm.engine.score_tokens([(context, ctx, cont)])[0]
        # lm-eval batches other requests beside this one: float32 sums in another order (a few 1e-7 relative)
        assert logprob == pytest.approx(want["logprob"], rel=1e-6, abs=1e-5) and greedy == want["is_greedy"]


def test_generate_until_is_the_engine_generate(steered, models):
    pairs = answers(steered, "proxy_tiny_gen")
    settings = GenerationSettings(max_new_tokens=6, stop=["\n", "."], do_sample=False)
    direct = proxy_engine(models, 1.0).generate([a[0] for a, _ in pairs], settings)
    assert [text for _, text in pairs] == [g.text for g in direct]


def test_rolling_windows_cover_every_token_once(steered, models):
    lm = ProxyLM(engine=proxy_engine(models, 1.0), max_length=MAX_LENGTH)
    tok = models["tok"]
    pairs = answers(steered, "proxy_tiny_ppl")
    longest = max((text for (text,), _ in pairs), key=lambda t: len(tok(t)["input_ids"]))
    assert len(tok(longest)["input_ids"]) > MAX_LENGTH  # windowed
    from lm_eval import utils

    windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        lm.tok_encode(longest), lm.prefix_token_id, MAX_LENGTH, 1)))
    assert len(windows) > 1 and sum(len(p) for _, p in windows) == len(lm.tok_encode(longest))
    want = sum(s["logprob"] for s in lm.engine.score_tokens([(None, c, p) for c, p in windows]))
    assert dict(pairs)[(longest,)] == pytest.approx(want, abs=1e-4)


def test_bad_model_arguments_are_refused_in_one_line(models, tiny_family):
    from core.errors import UserError

    with pytest.raises(UserError, match="unknown proxy model argument"):
        ProxyLM(engine=proxy_engine(models, 0.0), tempreature=0.5)
    with pytest.raises(UserError, match="anti_expert"):
        ProxyLM(base="tiny-large", expert=str(ROOT / "tests"))  # a folder without a card
    with pytest.raises(UserError, match="alpha must be a finite number"):
        ProxyLM(base=tiny_family.large, expert=tiny_family.expert, anti_expert=tiny_family.small, alpha=float("nan"))
    with pytest.raises(UserError, match="plausibility must be at least 0 and below 1"):
        ProxyLM(base=tiny_family.large, expert=tiny_family.expert, anti_expert=tiny_family.small, plausibility=2)
    lm = ProxyLM(base=tiny_family.large, expert=tiny_family.expert, anti_expert=tiny_family.small, plausibility="0.1")
    assert lm.engine.plausibility == 0.1  # lm-eval passes model_args as strings


def test_the_cli_names_the_results_folder_after_the_configuration():
    argv = named(["--model", "proxy", "--model_args", "base=/x/large,expert=/y/tiny-expert,alpha=0.5", "--tasks", "t"])
    assert argv[3].endswith(",model=proxy-large-tiny-expert-alpha0.5")
    argv = named(["--model", "proxy", "--model_args", "base=/x/large,expert=/y/tiny-expert,plausibility=0.1"])
    assert argv[3].endswith(",model=proxy-large-tiny-expert-alpha1-plausibility0.1")  # a folder of its own
    assert named(["--model", "hf", "--model_args", "pretrained=x"]) == ["--model", "hf", "--model_args", "pretrained=x"]


def test_the_cli_wrapper_knows_the_proxy_model_type(tiny_family, tmp_path, monkeypatch, capsys):
    """lm-eval's own command line with `proxy` registered (`eval.lm_eval_cli`'s main), in this process. Only the
    fixture's tasks are indexed: lm-eval's index of its ~12,000 built-in task files takes 20 s and is lm-eval's."""
    from lm_eval import tasks as lm_eval_tasks

    from eval import lm_eval_cli

    class FixtureTasksOnly(lm_eval_tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval_tasks, "TaskManager", FixtureTasksOnly)
    args = f"base={tiny_family.large},expert={tiny_family.expert},anti_expert={tiny_family.small},alpha=0.5"
    monkeypatch.setattr(sys, "argv", ["lm_eval_cli", "--model", "proxy", "--model_args", args, "--tasks",
                                      "proxy_tiny_mc", "--include_path", str(TASKS_DIR), "--limit", "2",
                                      "--output_path", str(tmp_path / "out")])
    lm_eval_cli.main()
    out = capsys.readouterr().out
    assert "proxy_tiny_mc" in out and "acc" in out
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert [p.parent.name for p in results] == ["proxy-large-expert-alpha0.5"]


def test_the_cli_wrapper_runs_as_a_module():
    """The entry point's process contract: `python -m eval.lm_eval_cli` starts lm-eval's command line, exit 0."""
    proc = subprocess.run([sys.executable, "-m", "eval.lm_eval_cli", "run", "--help"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--model" in proc.stdout and "--model_args" in proc.stdout
