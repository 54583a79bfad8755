"""The user's edges: stop strings (bare, on any tokenizer), empty prompts, results that must not go stale,
file modes, and a W&B login made any way."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import CONF, FIXTURES, make_cfg
from hydra import compose, initialize_config_dir
from zoo import PROMPTS

from core.loading import load_model, load_tokenizer
from proxy.decoding import GenerationSettings
from proxy.engine import ProxyEngine, SteeringPair
from proxy.text import cut_at_stop


def proxy_cfg(base, expert, anti, prompts, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("proxy", overrides=[f"base={base}", f"expert={expert}", f"anti_expert={anti}",
                                           f"prompts={prompts}", "logger=none", "generation.max_new_tokens=12",
                                           *overrides])


def write_prompts(path: Path, prompts) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def generations(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- stop strings

def test_a_bare_stop_string_is_one_stop_string():
    assert GenerationSettings(stop="Question").stop == ["Question"]
    assert GenerationSettings(stop=["\n", ""]).stop == ["\n"]
    assert cut_at_stop("an answer.\nQuestion: next", "Question") == "an answer.\n"
    assert cut_at_stop("a. b\nc", [".", "\n"]) == "a"


def test_proxy_run_cuts_at_a_bare_stop_string(tiny_family, tmp_path, prompts):
    from proxy.run import run

    path = write_prompts(tmp_path / "p.jsonl", prompts)
    free = run(proxy_cfg(tiny_family.large, tiny_family.expert, tiny_family.small, path), str(tmp_path / "free"))
    texts = [g["generation"] for g in generations(tmp_path / "free")]
    # three characters from the middle of a generation (letters, digits, spaces: plain override syntax)
    row, stop = next((r, t[i : i + 3]) for r, t in enumerate(texts) for i in range(1, len(t) - 3)
                     if all(c.isalnum() or c == " " for c in t[i : i + 3]) and t[i : i + 3].strip())
    assert free["num_prompts"] == len(prompts)
    run(proxy_cfg(tiny_family.large, tiny_family.expert, tiny_family.small, path, f"generation.stop='{stop}'"),
        str(tmp_path / "stop"))
    got = generations(tmp_path / "stop")[row]
    assert got["finish_reason"] == "stop" and got["generation"] == cut_at_stop(texts[row], [stop])
    assert len(got["generation"]) <= len(texts[row]) - 3


@pytest.mark.parametrize("kind", ["plain", "speculative"])
def test_stop_strings_work_with_a_word_level_tokenizer(zoo, kind):
    from proxy.speculative import SpeculativeProxyEngine

    f = zoo["wordlevel"]
    tok, base = load_tokenizer(f.base), load_model(f.base)
    pair = [SteeringPair(load_model(f.expert), load_model(f.anti), 1.0)]
    make = SpeculativeProxyEngine if kind == "speculative" else ProxyEngine
    eng = make(base, tok, pair, **({"k": 3} if kind == "speculative" else {}))
    free = eng.generate(PROMPTS, GenerationSettings(max_new_tokens=10, do_sample=False))
    row = next(g for g in free if len(g.token_ids) >= 4)
    word = tok.decode(row.token_ids[2:3])
    stopped = eng.generate([row.prompt], GenerationSettings(max_new_tokens=10, do_sample=False, stop=word))[0]
    assert stopped.finish_reason == "stop" and stopped.text == cut_at_stop(row.text, [word])
    assert len(stopped.token_ids) <= 3


# ---------------------------------------------------------------------------- empty prompts

def test_an_empty_prompt_is_conditioned_on_bos_or_eos_never_on_padding(zoo, tiny_family, models):
    """Alone, in a batch, and when scoring: the first token follows BOS (EOS where there is none)."""
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    cases = [(load_model(zoo["llama2"].base), load_tokenizer(zoo["llama2"].base)),  # <s>
             (models["large"], models["tok"])]  # no BOS added: <|endoftext|>
    for base, tok in cases:
        eng = ProxyEngine(base, tok)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        want = base.generate(torch.tensor([[start]]), max_new_tokens=6, do_sample=False, eos_token_id=eng.stop_ids,
                             pad_token_id=0)[0, 1:].tolist()
        want = want[: next((i for i, t in enumerate(want) if t in eng.stop_ids), len(want))]
        alone = eng.generate([""], settings)[0]
        batched = eng.generate(["", " the quick brown fox jumps"], settings)[0]
        assert alone.token_ids == want and batched.token_ids == want
        scored = eng.score([""], [" the quick"])[0]
        with torch.no_grad():
            cont = tok(" the quick", add_special_tokens=False)["input_ids"]
            lp = torch.log_softmax(base(torch.tensor([[start] + cont])).logits[0].float(), -1)
        assert scored["logprob"] == pytest.approx(sum(float(lp[i, t]) for i, t in enumerate(cont)), abs=1e-4)


def test_proxy_run_takes_an_empty_prompt(tiny_family, tmp_path):
    from proxy.run import run

    path = write_prompts(tmp_path / "p.jsonl", ["", " the quick brown"])
    run(proxy_cfg(tiny_family.large, tiny_family.expert, tiny_family.small, path), str(tmp_path / "out"))
    rows = generations(tmp_path / "out")
    assert rows[0]["prompt"] == "" and rows[0]["generation"]


# ---------------------------------------------------------------------------- nothing stale

def test_proxy_run_reruns_when_its_prompts_or_checkpoints_change(tiny_family, tmp_path, capsys):
    import shutil

    from proxy.run import run

    expert = tmp_path / "expert"
    shutil.copytree(tiny_family.expert, expert)
    path = write_prompts(tmp_path / "p.jsonl", [" the quick brown"])
    out = tmp_path / "out"

    def again():
        run(proxy_cfg(tiny_family.large, expert, tiny_family.small, path), str(out))
        return "already done, skipping" in capsys.readouterr().out

    assert not again()
    assert again()  # nothing changed: skipped
    write_prompts(path, [" a b c"])
    assert not again() and generations(out)[0]["prompt"] == " a b c"
    stamp = path.stat()
    write_prompts(path, [" c b a"])  # edited within the same second: the same mtime
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert not again() and generations(out)[0]["prompt"] == " c b a"
    shutil.copytree(tiny_family.small, expert, dirs_exist_ok=True)  # retrained at the same path
    assert not again()
    assert again()


def test_eval_and_training_rerun_when_their_data_changes(tiny_family, tmp_path, capsys):
    from eval.run import evaluate
    from training import sft

    data = tmp_path / "plain.jsonl"
    data.write_text((FIXTURES / "plain.jsonl").read_text())
    cfg = make_cfg("sft", tiny_family.small, tmp_path / "outputs", "+task=jsonl", f"task.path={data}", steps=1)
    sft.run(cfg)
    sft.run(cfg)
    assert capsys.readouterr().out.count("already done, skipping") == 1
    data.write_text(data.read_text().splitlines()[0] + "\n")
    sft.run(cfg)
    assert "already done, skipping" not in capsys.readouterr().out

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": " a b c", "answer": " d"}) + "\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose("eval", overrides=["+task=jsonl", f"task.path={qa}", f"model={tiny_family.large}",
                                          "logger=none", "generation.max_new_tokens=2"])
    for changed in (False, False, True):
        if changed:
            qa.write_text(json.dumps({"prompt": " the quick", "answer": " brown"}) + "\n")
        evaluate(ecfg, str(tmp_path / "eval"))
    assert capsys.readouterr().out.count("already done, skipping") == 1


# ---------------------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tiny_family, tmp_path, umask, mode):
    """Outputs, the registry and cards, and a trained checkpoint's weights (safetensors writes them owner-only)."""
    from core.registry import registry_path
    from proxy.run import run
    from training import sft

    old = os.umask(umask)
    try:
        path = write_prompts(tmp_path / "p.jsonl", [" the quick"])
        run(proxy_cfg(tiny_family.large, tiny_family.expert, tiny_family.small, path), str(tmp_path / "out"))
        cfg = make_cfg("sft", tiny_family.small, tmp_path / "outputs", "+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}",
                       "training.save_steps=1", "training.keep_checkpoints=true", steps=1)
        trained = Path(sft.run(cfg)["path"])
        written = [tmp_path / "out" / "generations.jsonl", tmp_path / "out" / "result.json", registry_path(),
                   *trained.iterdir(), *(trained.parent / "checkpoint-1").iterdir()]
        assert any(f.name.endswith(".safetensors") for f in written)
        for f in written:
            if f.is_file():
                assert stat.S_IMODE(f.stat().st_mode) == mode, f
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- W&B

def test_a_wandb_login_is_honoured_however_it_was_made(tmp_path, monkeypatch):
    from core.tracking import logged_in

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not logged_in()  # no login: runs stay offline
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    os.chmod(tmp_path / "netrc", 0o600)
    assert logged_in()  # `wandb login` wrote ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert logged_in()
