"""eval.run, the sweep summary, the gap-closed report, and the demo pipeline at test scale."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from core.registry import Card, register
from eval.report import build_table, find_runs, gap_closed, write_report

ROOT = Path(__file__).resolve().parent.parent


def fake_run(folder: Path, role: str, model: str, score: float, num_examples: int = 10, **extra) -> None:
    folder.mkdir(parents=True)
    record = {"task": "tinyworld", "split": "test", "metric": "exact_match", "role": role, "model": model,
              "metrics": {"exact_match": score, "num_examples": num_examples,
                          "changed_share": 0.2 if role == "proxy" else None}, **extra}
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


def test_report_compares_runs_over_the_same_examples_only(tmp_path):
    """A quick task.limit run beside the full one: the table takes the full evaluation, whole."""
    small, large, expert = tmp_path / "small", tmp_path / "large", tmp_path / "expert"
    for d in (small, large, expert):
        d.mkdir()
    register(Card(name="n-expert", path=str(expert), tuned_from=str(small), task="tinyworld", method={}))
    runs = tmp_path / "runs"
    for size, base_score, proxy_score in ((3, 0.9, 0.1), (40, 0.2, 0.6)):
        fake_run(runs / f"base{size}", "model", str(large), base_score, num_examples=size)
        fake_run(runs / f"proxy{size}", "proxy", str(large), proxy_score, num_examples=size, expert="n-expert",
                 anti_expert=str(small), alpha=1.0)
    rows = build_table(find_runs([runs]))
    assert [(r["kind"], r["exact_match"]) for r in rows] == [("large base", 0.2), ("proxy", 0.6)]
    assert all(Path(r["run_dir"]).name.endswith("40") for r in rows)
    report = json.loads(write_report([runs], tmp_path / "report").read_text())
    assert report["num_examples"] == 40


def test_gap_closed_is_undefined_without_a_gap():
    assert gap_closed(0.5, 0.3, 0.3) is None
    assert gap_closed(0.3, 0.1, 0.5) == pytest.approx(0.5)


def env(tmp_path, **extra):
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow
def test_the_demo_runs_end_to_end_at_test_scale(tmp_path, monkeypatch, capsys):
    """`python -m scripts.demo --scale test`, in this process: it ends with the report's path."""
    from scripts import demo

    monkeypatch.setenv("PROXY_FAMILY_DIR", str(tmp_path / "family"))  # the presets and the task read it
    monkeypatch.setattr(demo, "FAMILY_DIR", tmp_path / "family")
    monkeypatch.setattr(sys, "argv", ["demo", "--scale", "test", "--out", str(tmp_path / "demo")])
    try:
        demo.main()
    finally:
        torch.set_num_threads(1)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(Path(last).read_text())
    kinds = {r["kind"] for r in report["rows"]}
    assert kinds == {"small base", "small expert", "large base", "large tuned", "proxy"}
    proxies = [r for r in report["rows"] if r["kind"] == "proxy"]
    assert {r["alpha"] for r in proxies} == {0.5, 1.0, 1.5, 2.0}
    assert any(r.get("variant") == "nf4" for r in proxies)
    assert Path(report["plot"]).exists()
    # the expert's card names the small base as what it was tuned from; the DPO expert's too (lineage)
    registry = json.loads(Path(os.environ["PROXY_REGISTRY"]).read_text())
    assert registry["tiny-expert"]["tuned_from"] == "tiny-small"
    assert registry["tiny-expert-dpo"]["tuned_from"] == "tiny-small"


def test_sweep_job_folder_names_are_flat_and_unique():
    from core.jobs import safe_name

    long = "base=/a/very/long/path/" + "x" * 200 + ",proxy.alpha="
    assert "/" not in safe_name(long + "0") and len(safe_name(long + "0")) <= 120
    assert safe_name(long + "0") != safe_name(long + "1")
    assert safe_name("proxy.alpha=0.5") == "proxy.alpha=0.5"


def test_mc1_picks_the_choice_the_proxy_finds_likeliest(tiny_family, tmp_path):
    from hydra import compose, initialize_config_dir

    from core.loading import CONF_DIR, load_model, load_tokenizer
    from eval.run import evaluate
    from proxy.engine import ProxyEngine, SteeringPair

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
