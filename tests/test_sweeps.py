"""Sweeps of the real entry point through Hydra's submitit launcher and the Optuna sweeper (tiny family)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from core.loading import load_model, load_tokenizer
from proxy.engine import GenerationSettings, ProxyEngine

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
NEW_TOKENS = 4

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def proxy_run(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "proxy.run", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def job_args(tiny_family, prompts, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:2]))
    return [f"base={tiny_family.large}", f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
            f"prompts={prompts_file}", "logger=none", f"generation.max_new_tokens={NEW_TOKENS}"]


def job_dirs(sweep: Path) -> dict[float, Path]:
    """{alpha: job folder}, from each job's own record of its config."""
    return {float(yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["proxy"]["alpha"]): d
            for d in sweep.iterdir() if (d / ".hydra" / "config.yaml").exists()}


def generations(job: Path) -> list[str]:
    return [json.loads(line)["generation"] for line in (job / "generations.jsonl").read_text().splitlines()]


def submitit_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted((sweep / ".submitit").rglob("*_log.out")))


@pytest.mark.parametrize("launcher, target, gpus", [("slurm", "SlurmLauncher", 1), ("local", "LocalLauncher", None)])
def test_launcher_configs_compose_with_the_proxy_app(launcher, target, gpus):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("proxy", overrides=["expert=x", f"hydra/launcher={launcher}"], return_hydra_config=True)
    conf = cfg.hydra.launcher
    assert conf._target_.endswith(target)
    assert conf.gpus_per_node == gpus
    if launcher == "slurm":
        assert conf.partition is None and conf.timeout_min >= 60  # the partition is the user's to give
    assert cfg.hydra.runtime.choices["hydra/job_logging"] == "none"  # composes with proxy.yaml's overrides


@pytest.mark.slow
def test_local_submitit_sweep_runs_each_job_and_a_rerun_skips_them(job_args, tiny_family, prompts, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=local", "proxy.alpha=0,1", f"hydra.sweep.dir={sweep}", *job_args]
    first = proxy_run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert sorted(jobs) == [0.0, 1.0]
    assert all((j / "generations.jsonl").exists() and (j / "result.json").exists() for j in jobs.values())
    assert submitit_logs(sweep).count("wrote 2 generations") == 2  # each job ran in its own submitit process

    base = ProxyEngine(load_model(tiny_family.large), load_tokenizer(tiny_family.large))
    want = [g.text for g in base.generate(prompts[:2], GenerationSettings(max_new_tokens=NEW_TOKENS))]
    assert generations(jobs[0.0]) == want

    stamps = {k: (j / "generations.jsonl").stat().st_mtime_ns for k, j in jobs.items()}
    second = proxy_run(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert submitit_logs(sweep).count("already done, skipping") == 2
    assert {k: (j / "generations.jsonl").stat().st_mtime_ns for k, j in jobs.items()} == stamps


@pytest.mark.slow
def test_optuna_calibrates_alpha_with_eval_run_and_reports_the_best(tiny_family, tmp_path):
    """Also: an eval.run sweep ends with its summary table and plot (the SweepSummary callback)."""
    sweep = tmp_path / "optuna"
    task = ROOT / "tests" / "fixtures" / "plain.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    run = subprocess.run(
        [sys.executable, "-m", "eval.run", "-m", "+hparams_search=alpha_optuna", "hydra.sweeper.n_trials=2",
         "+task=jsonl", f"task.path={task}", f"base={tiny_family.large}", f"expert={tiny_family.expert}",
         f"anti_expert={tiny_family.small}", "logger=none", f"generation.max_new_tokens={NEW_TOKENS}",
         f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    trials = {a: json.loads((d / "metrics.json").read_text()) for a, d in job_dirs(sweep).items()}
    assert len(trials) == 2 and all(0.0 <= a <= 2.0 for a in trials)
    scores = {a: t["metrics"][t["metric"]] for a, t in trials.items()}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(scores.values())  # what eval.run's main returned, maximised
    assert scores[best["best_params"]["proxy.alpha"]] == best["best_value"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["alpha"] for r in summary["rows"]) == sorted(trials)
    assert all(r["changed_share"] is not None for r in summary["rows"])
    assert (sweep / "alpha_curve.png").stat().st_size > 1000
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith("| job |") and len(table) == 4


@pytest.mark.parametrize("app", ["eval", "proxy"])
def test_alpha_search_config_composes_with_the_optuna_sweeper(app):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(app, overrides=["expert=x", "+hparams_search=alpha_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert str(sweeper.direction).endswith("maximize")
    assert sweeper.params["proxy.alpha"] == "interval(0, 2)"
    assert sweeper.n_trials >= 8
