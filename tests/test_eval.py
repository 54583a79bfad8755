"""eval.run, the sweep summary, the gap-closed report, and the demo pipeline at test scale."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from core.registry import Card, register
from eval.report import (
    build_table,
    combine_reports,
    find_runs,
    gap_closed,
    seed_of,
    write_report,
)

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
    assert list(report["tasks"]) == ["tinyworld"]
    assert report["tasks"]["tinyworld"]["best_proxy"]["alpha"] == 1.0 and Path(report["plot"]).stat().st_size > 1000


def test_runs_of_several_tasks_give_one_table_each(tmp_path):
    small, large, tuned = (tmp_path / n for n in ("small", "large", "tuned"))
    for d in (small, large, tuned):
        d.mkdir()
    register(Card(name="t-expert", path=str(small), tuned_from=str(small), task="tinymath", method={}))
    register(Card(name="t-large-math", path=str(tuned), tuned_from=str(large), task="tinymath", method={}))
    runs = tmp_path / "runs"
    fake_run(runs / "qa" / "base", "model", str(large), 0.0)
    fake_run(runs / "qa" / "proxy", "proxy", str(large), 0.5, expert="t-expert", alpha=1.0)
    for name, role, model, score, extra in (("base", "model", str(large), 0.1, {}),
                                            ("tuned", "model", "t-large-math", 0.7, {}),
                                            ("proxy", "proxy", str(large), 0.55, {"expert": "t-expert", "alpha": 1.0})):
        fake_run(runs / "math" / name, role, model, score, **extra)
        record = json.loads((runs / "math" / name / "metrics.json").read_text())
        record.update(task="tinymath", metric="gsm8k_accuracy", metrics={"gsm8k_accuracy": score})
        (runs / "math" / name / "metrics.json").write_text(json.dumps(record))
    report = json.loads(write_report([runs], tmp_path / "report").read_text())
    assert list(report["tasks"]) == ["tinymath", "tinyworld"]  # in the order the runs were found
    math = report["tasks"]["tinymath"]
    assert math["metric"] == "gsm8k_accuracy"
    assert [r["kind"] for r in math["rows"]] == ["large base", "large tuned", "proxy"]
    assert math["best_proxy"]["gap_closed"] == pytest.approx((0.55 - 0.1) / (0.7 - 0.1))
    assert "gap_closed" not in report["tasks"]["tinyworld"]["rows"][-1]  # no tuned reference there


def seed_report(folder: Path, base: float, tuned: float, proxies: dict[float, float], extra_row: bool = False) -> Path:
    """A seed's report.json as write_report leaves it (one task)."""
    rows = [{"kind": "large base", "model": "tiny-large", "exact_match": base},
            {"kind": "large tuned", "model": "tiny-large-tuned", "exact_match": tuned}]
    for alpha, score in proxies.items():
        rows.append({"kind": "proxy", "model": "tiny-large", "expert": "tiny-expert", "alpha": alpha,
                     "exact_match": score, "changed_share": 0.25, "gap_closed": gap_closed(score, base, tuned)})
    if extra_row:
        rows.append({"kind": "proxy", "model": "tiny-large", "expert": "tiny-expert", "alpha": 1.0,
                     "variant": "nf4", "exact_match": 0.5, "gap_closed": 0.5})
    folder.mkdir(parents=True)
    path = folder / "report.json"
    path.write_text(json.dumps({"tasks": {"tinyworld": {"metric": "exact_match", "rows": rows}}}))
    return path


def test_combined_report_gives_mean_and_sd_over_seeds(tmp_path):
    paths = {0: seed_report(tmp_path / "seed-0", 0.0, 0.8, {1.0: 0.6, 2.0: 0.7}, extra_row=True),
             1: seed_report(tmp_path / "seed-1", 0.0, 1.0, {1.0: 0.9, 2.0: 0.5})}
    report = json.loads(combine_reports(paths, tmp_path / "report").read_text())
    assert report["seeds"] == [0, 1] and Path(report["plot"]).exists()
    table = report["tasks"]["tinyworld"]
    rows = {(r["kind"], r.get("alpha")): r for r in table["rows"]}
    assert len(table["rows"]) == 4  # the nf4 row of seed 0 alone is left out
    tuned = rows[("large tuned", None)]
    assert tuned["exact_match"] == pytest.approx(0.9) and tuned["exact_match_sd"] == pytest.approx(0.02 ** 0.5)
    assert tuned["exact_match_per_seed"] == {"0": 0.8, "1": 1.0}
    proxy = rows[("proxy", 1.0)]
    assert proxy["gap_closed_per_seed"] == {"0": pytest.approx(0.75), "1": pytest.approx(0.9)}
    assert proxy["gap_closed"] == pytest.approx(0.825) and proxy["gap_closed_sd"] == pytest.approx(0.15 / 2 ** 0.5)
    assert proxy["changed_share_sd"] == pytest.approx(0.0)
    (best,) = table["best"]
    # each seed at its own best alpha: seed 0 at alpha 2 (0.875), seed 1 at alpha 1 (0.9)
    assert best["best_gap_closed_per_seed"] == {"0": pytest.approx(0.875), "1": pytest.approx(0.9)}
    assert best["best_gap_closed"] == pytest.approx(0.8875) and best["alpha"] == 1.0  # best on average


def test_one_seed_has_no_sd(tmp_path, capsys):
    path = combine_reports({3: seed_report(tmp_path / "seed-3", 0.1, 0.9, {1.0: 0.5})}, tmp_path / "report")
    row = json.loads(path.read_text())["tasks"]["tinyworld"]["rows"][-1]
    assert row["exact_match"] == pytest.approx(0.5) and row["exact_match_sd"] is None
    assert row["exact_match_per_seed"] == {"3": 0.5}
    assert "50.0%" in capsys.readouterr().out


def test_report_cli_combines_seeds_named_by_their_folders(tmp_path, capsys):
    from eval.report import main

    a = seed_report(tmp_path / "demo" / "seed-4" / "report", 0.0, 1.0, {1.0: 0.8})
    b = seed_report(tmp_path / "demo" / "seed-7" / "report", 0.0, 1.0, {1.0: 0.9})
    main(["--combine", str(a), str(b), "--out", str(tmp_path / "both")])
    out = capsys.readouterr().out
    assert "85.0 ± 7.1%" in out and "best alpha, tiny-expert: gap closed 85 ± 7% (seeds: 80%, 90%)" in out
    assert json.loads((tmp_path / "both" / "report.json").read_text())["seeds"] == [4, 7]
    assert seed_of("x/report.json", 5) == 5


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
    table = next(iter(report["tasks"].values()))
    assert table["num_examples"] == 40 and table["split"] is not None


def test_gap_closed_is_undefined_without_a_gap():
    assert gap_closed(0.5, 0.3, 0.3) is None
    assert gap_closed(0.3, 0.1, 0.5) == pytest.approx(0.5)


def env(tmp_path, **extra):
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow
def test_the_demo_runs_end_to_end_at_test_scale(tmp_path, monkeypatch, capsys):
    """`python -m demo --scale test --jobs 1` in this process: it ends with the report's path.
    (`make demo` runs the same stages two at a time in worker processes: test_stages.py runs the
    runner's workers, and test_every_demo_stage_can_go_to_a_worker the demo's stages.)"""
    from demo import job as demo

    monkeypatch.setenv("PROXY_FAMILY_DIR", str(tmp_path / "family"))  # the presets and the task read it
    monkeypatch.setattr(demo, "FAMILY_DIR", tmp_path / "family")
    monkeypatch.setattr(sys, "argv", ["demo", "--scale", "test", "--out", str(tmp_path / "demo"), "--alphas", "0.5", "1",
                                      "--jobs", "1"])
    try:
        demo.main()
    finally:
        torch.set_num_threads(1)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(Path(last).read_text())
    assert report["seeds"] == [0] and set(report["tasks"]) == {"tinyworld", "tinychat", "tinymath"}
    for task, table in report["tasks"].items():
        kinds = {r["kind"] for r in table["rows"]}
        assert kinds == {"small base", "small expert", "large base", "large tuned", "proxy"}, task
        assert {r["alpha"] for r in table["rows"] if r["kind"] == "proxy"} == {0.5, 1.0}
        constrained = [r for r in table["rows"] if r.get("variant") == f"plausibility {demo.PLAUSIBILITY:g}"]
        assert {r["alpha"] for r in constrained} == {0.5, 1.0}, task  # the full-SFT expert, both rules
        assert {Path(r["expert"]).name for r in constrained} == {demo.TASKS[task][0]}, task
    proxies = [r for r in report["tasks"]["tinyworld"]["rows"] if r["kind"] == "proxy"]
    assert any(r.get("variant") == "nf4" for r in proxies)
    assert Path(report["plot"]).exists()
    # the expert's card names the small base as what it was tuned from; the DPO expert's too (lineage)
    registry = json.loads(Path(os.environ["PROXY_REGISTRY"]).read_text())
    assert registry["tiny-expert"]["tuned_from"] == "tiny-small"
    assert registry["tiny-expert-dpo"]["tuned_from"] == "tiny-small"
    # the chat expert's tokenizer holds its markers as tokens the base does not have
    chat = json.loads(Path(registry["tiny-chat-expert"]["card"]).read_text())
    assert chat["added_tokens"] == ["<|user|>", "<|assistant|>", "<|end|>"]
    base_vocabulary = len(AutoTokenizer.from_pretrained(tmp_path / "family" / "tokenizer"))
    assert len(AutoTokenizer.from_pretrained(chat["path"])) == base_vocabulary + 3


def test_every_demo_stage_can_go_to_a_worker(tmp_path):
    """What a spawned worker receives: each stage pickles by reference to a module-level function, with
    plain arguments, and each needs only stages listed before it."""
    import pickle

    from demo import job as demo
    from demo.stages import check_order

    tuning, experts = demo.tuning_stages(tmp_path, dpo=True)
    stages = [*tuning, *demo.evaluation_stages(tmp_path, experts)]
    check_order(stages)
    # + each task's full-SFT expert with plausibility, + the fact expert steering the served base (top 20, 5; both
    # rules); + the expert of the other tokenizer: its small base and itself alone, and at each alpha
    assert len(tuning) == 9 and len(stages) == 9 + 36 + 12 + 4 + 2 + 4
    assert needs_of(stages)["eval-tinyworld-proxy-tiny-other-expert-a1"] == ("tiny-other-expert",)
    for stage in stages:
        assert pickle.loads(pickle.dumps(stage)) == stage
        assert stage.fn in (demo.train, demo.evaluate, demo.evaluate_served)
    needs = needs_of(stages)
    assert needs["tiny-expert-dpo"] == ("tiny-expert",)
    assert needs["eval-tinyworld-proxy-tiny-expert-dpo-a1"] == ("tiny-expert-dpo",)
    assert needs["eval-tinymath-tiny-large"] == ()  # the family's own base waits for nothing


def needs_of(stages) -> dict:
    return {s.name: s.needs for s in stages}


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
