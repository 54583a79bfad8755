"""The decoding benchmark's pieces: the deepened base is the same function, and the JSON has its fields."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from scripts import bench_decoding
from scripts.bench_decoding import expand_blocks


def test_block_expansion_keeps_the_function_and_multiplies_the_work(models, prompts):
    base = models["large"]
    deep = expand_blocks(base, 3)
    assert deep.config.num_hidden_layers == 3 * base.config.num_hidden_layers
    ids = models["tok"](prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = base(**ids).logits
        got = deep(**ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    pair = [SteeringPair(models["expert"], models["small"], 1.0)]
    settings = GenerationSettings(max_new_tokens=12)
    assert ([g.token_ids for g in ProxyEngine(deep, models["tok"], pair).generate(prompts, settings)]
            == [g.token_ids for g in ProxyEngine(base, models["tok"], pair).generate(prompts, settings)])
    # the added blocks are real work: only their output projections are zero
    added = deep.model.layers[1]
    assert added.self_attn.q_proj.weight.abs().sum() > 0 and added.mlp.down_proj.weight.abs().sum() == 0


def test_the_benchmark_writes_one_entry_per_configuration(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [
        "bench", "--family", str(tiny_family.root), "--expert", tiny_family.expert, "--batch", "1", "2",
        "--prompts", "2", "--task-prompts", "2", "--new-tokens", "4", "--qa-tokens", "6", "--repeats", "1",
        "--deep-factor", "2", "--out", str(out),
    ])
    try:
        bench_decoding.main()
    finally:
        torch.set_num_threads(1)
    results = json.loads(out.read_text())["results"]
    names = {(e["workload"], e["name"], e["batch"]) for e in results}
    for workload in ("task_prompts", "deep_base"):
        for batch in (1, 2):
            for name in ("base_generate", "proxy", "speculative_k2", "speculative_k4", "speculative_k6",
                         "speculative_kauto"):
                assert (workload, name, batch) in names
    for e in results:
        assert {"name", "batch", "new_tokens", "tokens_per_s", "ratio_to_base"} <= set(e)
        assert e["new_tokens"] > 0 and e["tokens_per_s"] > 0
        if e["name"].startswith("speculative"):
            assert 0 <= e["acceptance_rate"] <= 1 and 0 < e["base_forwards_per_token"] <= 1
        if e["workload"] == "deep_base":
            assert e["r"] > 0


def test_the_benchmark_takes_real_model_names_and_a_4bit_base(tiny_family, tmp_path, monkeypatch, prompts):
    """--base/--expert/--anti-expert as a user on a GPU would give them (here folders, NF4 on the CPU)."""
    pytest.importorskip("bitsandbytes")
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:2]))
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [
        "bench", "--base", tiny_family.large, "--base-quantization", "nf4", "--expert", tiny_family.expert,
        "--anti-expert", tiny_family.small, "--prompts-file", str(prompt_file), "--batch", "2", "--prompts", "2",
        "--new-tokens", "3", "--qa-tokens", "4", "--stop", ".", "--repeats", "1", "--out", str(out),
    ])
    try:
        bench_decoding.main()
    finally:
        torch.set_num_threads(1)
    results = json.loads(out.read_text())["results"]
    assert {e["workload"] for e in results} == {"fixed_length", "task_prompts"}  # no deep base for real models
    assert {"base_generate", "proxy", "speculative_kauto"} <= {e["name"] for e in results}
    assert "naive_loop" not in {e["name"] for e in results}


def test_the_benchmark_refuses_a_foreign_expert_in_one_line(tiny_family, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "--base", tiny_family.large, "--expert", tiny_family.foreign,
                                      "--anti-expert", tiny_family.small])
    with pytest.raises(SystemExit) as stop:
        bench_decoding.main()
    assert stop.value.code == 2
    assert "does not match" in capsys.readouterr().err.strip().splitlines()[-1]
