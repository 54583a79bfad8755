"""eval.run, the sweep summary, the gap-closed report, and the demo pipeline at test scale."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.report import build_table, find_runs, gap_closed, write_report
from training.registry import Card, register

ROOT = Path(__file__).resolve().parent.parent


def fake_run(folder: Path, role: str, model: str, score: float, **extra) -> None:
    folder.mkdir(parents=True)
    record = {"task": "tinyworld", "metric": "exact_match", "role": role, "model": model,
              "metrics": {"exact_match": score, "changed_share": 0.2 if role == "proxy" else None}, **extra}
    (folder / "metrics.json").write_text(json.dumps(record))


def test_report_finds_every_role_from_the_cards(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    expert, tuned = tmp_path / "expert", tmp_path / "large_tuned"
    for d in (small, large, expert, tuned):
        d.mkdir()
    register(Card(name="r-expert", path=str(expert), tuned_from=str(small), task="tinyworld", method={}))
    register(Card(name="r-large-tuned", path=str(tuned), tuned_from=str(large), task="tinyworld", method={}))
    runs = tmp_path / "runs"
    fake_run(runs / "a", "model", str(small), 0.0)
    fake_run(runs / "b", "model", "r-expert", 0.05)
    fake_run(runs / "c", "model", str(large), 0.10)
    fake_run(runs / "d", "model", str(tuned), 0.90)  # named by path: the card still identifies it
    for i, (alpha, score) in enumerate(((0.5, 0.5), (1.0, 0.82))):
        fake_run(runs / f"p{i}", "proxy", str(large), score, expert="r-expert", anti_expert=str(small), alpha=alpha)
    rows = build_table(find_runs([runs]))
    kinds = [r["kind"] for r in rows]
    assert kinds == ["small base", "small expert", "large base", "large tuned", "proxy", "proxy"]
    proxy = [r for r in rows if r["kind"] == "proxy"]
    assert proxy[1]["gap_closed"] == pytest.approx((0.82 - 0.10) / (0.90 - 0.10))
    assert proxy[0]["gap_closed"] == pytest.approx(0.5)
    path = write_report([runs], tmp_path / "report")
    report = json.loads(path.read_text())
    assert report["best_proxy"]["alpha"] == 1.0 and Path(report["plot"]).stat().st_size > 1000


def test_gap_closed_is_undefined_without_a_gap():
    assert gap_closed(0.5, 0.3, 0.3) is None
    assert gap_closed(0.3, 0.1, 0.5) == pytest.approx(0.5)


def env(tmp_path, **extra):
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow
def test_a_two_job_sweep_ends_with_its_summary_table_and_plot(tiny_family, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "eval.run", "-m", "+task=triviaqa",
           f"task.data_files={ROOT / 'tests' / 'fixtures' / 'triviaqa.jsonl'}", f"base={tiny_family.large}",
           f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}", "proxy.alpha=0,1",
           "generation.max_new_tokens=6", f"hydra.sweep.dir={sweep}", "logger=none"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["alpha"] for r in summary["rows"]) == [0.0, 1.0]
    assert (sweep / "alpha_curve.png").stat().st_size > 1000
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith("| job |") and len(table) == 4
    by_alpha = {r["alpha"]: r for r in summary["rows"]}
    assert by_alpha[0.0]["changed_share"] == 0 and by_alpha[1.0]["changed_share"] > 0


@pytest.mark.slow
def test_the_demo_runs_end_to_end_at_test_scale(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.demo", "--scale", "test", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=env(tmp_path, PROXY_FAMILY_DIR=str(tmp_path / "family"),
                                 PROXY_REGISTRY=str(tmp_path / "registry.json")))
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    report = json.loads(Path(last).read_text())
    kinds = {r["kind"] for r in report["rows"]}
    assert kinds == {"small base", "small expert", "large base", "large tuned", "proxy"}
    proxies = [r for r in report["rows"] if r["kind"] == "proxy"]
    assert {r["alpha"] for r in proxies} == {0.5, 1.0, 1.5, 2.0}
    assert any(r.get("variant") == "nf4" for r in proxies)
    assert Path(report["plot"]).exists()
    # the expert's card names the small base as what it was tuned from; the DPO expert's too (lineage)
    registry = json.loads((tmp_path / "registry.json").read_text())
    assert registry["tiny-expert"]["tuned_from"] == "tiny-small"
    assert registry["tiny-expert-dpo"]["tuned_from"] == "tiny-small"


def test_sweep_job_folder_names_are_flat_and_unique():
    from proxy.jobs import safe_name

    long = "base=/a/very/long/path/" + "x" * 200 + ",proxy.alpha="
    assert "/" not in safe_name(long + "0") and len(safe_name(long + "0")) <= 120
    assert safe_name(long + "0") != safe_name(long + "1")
    assert safe_name("proxy.alpha=0.5") == "proxy.alpha=0.5"


def test_mc1_picks_the_choice_the_proxy_finds_likeliest(tiny_family, tmp_path):
    from hydra import compose, initialize_config_dir

    from eval.run import evaluate
    from proxy.engine import ProxyEngine, SteeringPair
    from proxy.loading import CONF_DIR, load_model, load_tokenizer

    fixture = ROOT / "tests" / "fixtures" / "truthfulqa_mc1.jsonl"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "+task=truthfulqa_mc1", f"task.data_files={fixture}", f"base={tiny_family.large}",
            f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}", "proxy.alpha=1.0", "logger=none"])
    record = evaluate(cfg, out_dir=str(tmp_path / "mc1"))
    engine = ProxyEngine(load_model(tiny_family.large), load_tokenizer(tiny_family.large),
                         [SteeringPair(load_model(tiny_family.expert), load_model(tiny_family.small), 1.0)])
    want = []
    for line in fixture.read_text().splitlines():
        rec = json.loads(line)
        choices = rec["mc1_targets"]["choices"]
        lls = [s["logprob"] for s in engine.score([f"Q: {rec['question']}\nA:"] * len(choices),
                                                  [f" {c}" for c in choices])]
        want.append(float(max(range(len(lls)), key=lls.__getitem__) == rec["mc1_targets"]["labels"].index(1)))
    assert record["metric"] == "mc1" and record["metrics"]["num_examples"] == 4
    assert record["metrics"]["mc1"] == pytest.approx(sum(want) / len(want))
