"""The `proxy` lm-eval model type on local JSONL tasks (tests/fixtures/lm_eval) with the tiny family."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

import eval.lm_eval_proxy  # noqa: E402,F401  registers "proxy"
from eval.lm_eval_proxy import ProxyLM  # noqa: E402
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["proxy_tiny_mc", "proxy_tiny_gen", "proxy_tiny_ppl"]
MAX_LENGTH = 48  # below the longest perplexity text, so rolling windows are exercised


def evaluate(tiny_family, alpha, tasks=TASKS):
    from lm_eval.tasks import TaskManager

    args = (f"base={tiny_family.large},expert={tiny_family.expert},anti_expert={tiny_family.small},"
            f"alpha={alpha},max_length={MAX_LENGTH}")
    return lm_eval.simple_evaluate(model="proxy", model_args=args, tasks=tasks, log_samples=True,
                                   bootstrap_iters=0, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))


@pytest.fixture(scope="module")
def steered(tiny_family):
    return evaluate(tiny_family, alpha=1.0)


def proxy_engine(models, alpha):
    return ProxyEngine(models["large"], models["tok"], [SteeringPair(models["expert"], models["small"], alpha)])


def base_engine(models):
    return ProxyEngine(models["large"], models["tok"])


def requests_and_answers(results, task):
    """[(args, answer)] over every request lm-eval made for the task."""
    pairs = []
    for sample in results["samples"][task]:
        pairs += [(tuple(a), r[0]) for a, r in zip(sample["arguments"], sample["resps"])]
    return pairs


def check_loglikelihoods(results, engine):
    pairs = requests_and_answers(results, "proxy_tiny_mc")
    assert len(pairs) == 10  # 3 + 2 + 3 + 2 choices
    direct = engine.score([a[0] for a, _ in pairs], [a[1] for a, _ in pairs])
    for (args, (logprob, greedy)), want in zip(pairs, direct):
        assert logprob == pytest.approx(want["logprob"], rel=1e-5, abs=1e-5), args
        assert greedy == want["is_greedy"]


def check_generations(results, engine):
    pairs = requests_and_answers(results, "proxy_tiny_gen")
    settings = GenerationSettings(max_new_tokens=6, stop=["\n", "."])
    direct = engine.generate([a[0] for a, _ in pairs], settings)
    assert [text for _, text in pairs] == [g.text for g in direct]


def test_every_task_runs_and_reports_its_metric(steered):
    res = steered["results"]
    assert 0.0 <= res["proxy_tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in res["proxy_tiny_gen"]
    assert res["proxy_tiny_ppl"]["word_perplexity,none"] > 1.0


def test_loglikelihood_is_the_engine_score(steered, models):
    check_loglikelihoods(steered, proxy_engine(models, 1.0))


def test_generate_until_is_the_engine_generate(steered, models):
    check_generations(steered, proxy_engine(models, 1.0))


def test_rolling_scores_the_text_after_eos_in_windows(steered, models, tiny_family):
    lm = ProxyLM(engine=proxy_engine(models, 1.0), max_length=MAX_LENGTH)
    tok = models["tok"]
    pairs = requests_and_answers(steered, "proxy_tiny_ppl")
    assert len(pairs) == 3
    windowed = 0
    for (text,), total in pairs:
        windows = lm.rolling_windows(text)
        assert windows[0][0] == tok.eos_token  # the first token is conditioned on BOS/EOS
        assert "".join(pred for _, pred in windows) == text  # every token predicted once
        if len(tok(text)["input_ids"]) < MAX_LENGTH:
            want = lm.engine.score([tok.eos_token], [text])[0]
            assert want["num_tokens"] == len(tok(text)["input_ids"])
            assert total == pytest.approx(want["logprob"], rel=1e-5)
        else:
            windowed += 1
            assert len(windows) > 1
            assert total == pytest.approx(sum(s["logprob"] for s in lm.engine.score(*zip(*windows))), rel=1e-5)
    assert windowed == 1


def test_alpha_zero_is_the_base_alone(tiny_family, models):
    results = evaluate(tiny_family, alpha=0.0, tasks=["proxy_tiny_mc", "proxy_tiny_gen"])
    check_loglikelihoods(results, base_engine(models))
    check_generations(results, base_engine(models))


def test_bad_model_arguments_are_refused_in_one_line(models, tiny_family):
    from proxy.errors import UserError

    with pytest.raises(UserError, match="unknown proxy model argument"):
        ProxyLM(engine=base_engine(models), tempreature=0.5)
    with pytest.raises(UserError, match="anti_expert"):
        ProxyLM(base="tiny-large", expert=str(ROOT / "tests"))  # a folder without a card
    with pytest.raises(UserError, match="alpha must be a finite number"):
        ProxyLM(base=tiny_family.large, expert=tiny_family.expert, anti_expert=tiny_family.small, alpha=float("nan"))


@pytest.mark.slow
def test_the_cli_wrapper_knows_the_proxy_model_type(tiny_family, tmp_path):
    args = f"base={tiny_family.large},expert={tiny_family.expert},anti_expert={tiny_family.small},alpha=0.5"
    cmd = [sys.executable, "-m", "eval.lm_eval_cli", "--model", "proxy", "--model_args", args,
           "--tasks", "proxy_tiny_mc", "--include_path", str(TASKS_DIR), "--limit", "2",
           "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "proxy_tiny_mc" in proc.stdout and "acc" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))

