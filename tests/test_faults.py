"""The fault drill: bad input and faults end with exit status 2 and ONE `error: ...` line (no traceback),
and interrupted work resumes where it stopped.

Each entry point's contract is checked once through a real interpreter (`entry`); the other bad inputs
go through the same body in this process (`run_in_process`), where the exit status is not the point."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FIXTURES, ROOT, assert_one_error_line, compose_app, run_in_process

from core.errors import UserError
from proxy.run import run as proxy_run

pytestmark = pytest.mark.faults


def entry(module: str, *args: str, env: dict | None = None, timeout: int = 300) -> tuple[int, str, str]:
    """`python -m <module> <args>`: (exit status, stdout, stderr)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def prompts_file(tmp_path, prompts):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:2]))
    return path


@pytest.fixture
def proxy_args(tiny_family, prompts_file):
    return [f"base={tiny_family.large}", f"prompts={prompts_file}", "logger=none", "generation.max_new_tokens=4"]


def proxy_cli(tmp_path, *args):
    return run_in_process("proxy", proxy_run, *args, out_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------------------- bad input to proxy.run

def test_mismatched_tokenizers_with_wandb_logging_on(tiny_family, proxy_args, tmp_path, monkeypatch):
    """With W&B logging on (the default, offline here): the failure inside the logged job is one line too."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [a for a in proxy_args if a != "logger=none"]
    code, err = proxy_cli(tmp_path, *args, f"expert={tiny_family.foreign}", f"anti_expert={tiny_family.small}")
    assert_one_error_line(code, err, "tokenizer", "does not match")


def test_missing_checkpoint_path(tiny_family, proxy_args, tmp_path):
    result = proxy_cli(tmp_path, *proxy_args, "expert=/nonexistent/checkpoint", f"anti_expert={tiny_family.small}")
    assert_one_error_line(*result, "'/nonexistent/checkpoint' does not exist")


def test_unknown_registered_name(proxy_args, tmp_path):
    assert_one_error_line(*proxy_cli(tmp_path, *proxy_args, "expert=no-such-expert"), "'no-such-expert'")
    code, _, err = entry("training.registry", "show", "no-such-expert")
    assert_one_error_line(code, err, "'no-such-expert'")


def lora_adapter(model_path, folder):
    """An untrained rank-2 LoRA adapter over the model at `model_path`, saved in `folder`."""
    from peft import LoraConfig, get_peft_model

    from core.loading import load_model

    get_peft_model(load_model(model_path), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def test_shared_pair_checks_the_adapter_and_its_tokenizer(tiny_family, proxy_args, tmp_path):
    """proxy.shared_pair: an adapter over a model with another tokenizer, and a merged (adapter-less) expert."""
    adapter = lora_adapter(tiny_family.foreign, tmp_path / "foreign_lora")
    result = proxy_cli(tmp_path, *proxy_args, f"expert={adapter}", f"anti_expert={tiny_family.foreign}",
                       "proxy.shared_pair=true")
    assert_one_error_line(*result, "tokenizer", "does not match")
    result = proxy_cli(tmp_path, *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                       "proxy.shared_pair=true")
    assert_one_error_line(*result, "holds no LoRA adapter", "training.merge=false")


@pytest.mark.parametrize("option, fragment", [
    ("+proxy.alphas=2", "unknown proxy option(s) ['alphas']"),
    ("proxy.speculative.k=2 proxy.diagnostics=true", "not available with speculative decoding"),
    ("generation.top_p=1.5", "generation.top_p must lie in (0, 1]"),
    ("generation.max_new_tokens=abc", "generation.max_new_tokens must be a whole number"),
    ("proxy.plausibility=1", "proxy.plausibility must be at least 0 and below 1"),
    ("proxy.plausibility=abc", "proxy.plausibility must be a number"),
    ("proxy.plausibility=true", "proxy.plausibility must be a number, got true"),
])
def test_options_that_cannot_work_are_refused_before_loading(tiny_family, proxy_args, tmp_path, option, fragment):
    result = proxy_cli(tmp_path, *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                       *option.split())
    assert_one_error_line(*result, fragment)


def test_a_shared_pair_runs_against_the_adapter_s_own_base(tiny_family, proxy_args, tmp_path):
    adapter = lora_adapter(tiny_family.small, tmp_path / "small_lora")
    result = proxy_cli(tmp_path, *proxy_args, f"expert={adapter}", f"anti_expert={tiny_family.large}",
                       "proxy.shared_pair=true")
    assert_one_error_line(*result, "runs the adapter's own base", "drop anti_expert=")


def test_eval_takes_a_model_alone_or_a_proxy_not_both(tiny_family, tmp_path):
    from eval.run import evaluate

    result = run_in_process("eval", evaluate, f"model={tiny_family.large}", f"expert={tiny_family.expert}",
                            "+task=tinyworld", "logger=none", out_dir=str(tmp_path / "eval"))
    assert_one_error_line(*result, "not both")


def test_stop_strings_typed_on_a_command_line_read_escapes():
    from omegaconf import OmegaConf

    from proxy.options import generation_settings

    gen = OmegaConf.create({"max_new_tokens": 4, "stop": ["\\n\\nQuestion:", "a\\tb", "c\\\\n"]})
    assert generation_settings(gen).stop == ["\n\nQuestion:", "a\tb", "c\\n"]


@pytest.mark.parametrize("alpha, fragment", [("nan", "alpha must be a finite number"),
                                             ("inf", "alpha must be a finite number"), ("abc", "'abc'")])
def test_a_bad_alpha(tiny_family, proxy_args, tmp_path, alpha, fragment):
    result = proxy_cli(tmp_path, *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                       f"proxy.alpha={alpha}")
    assert_one_error_line(*result, "alpha", fragment)


def test_over_long_prompt(tiny_family, proxy_args, tmp_path):
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": " the" * 400}) + "\n")
    result = proxy_cli(tmp_path, *proxy_args, f"prompts={long_prompts}", f"expert={tiny_family.expert}",
                       f"anti_expert={tiny_family.small}")
    assert_one_error_line(*result, "exceeds the model's context")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("option, fragment", [("load.base.device_map=cuda", "device_map=cuda"),
                                              ("load.base.quantization=int8", "quantization=int8")])
def test_gpu_only_option_on_the_cpu(tiny_family, proxy_args, tmp_path, option, fragment):
    result = proxy_cli(tmp_path, *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                       option)
    assert_one_error_line(*result, fragment, "needs a CUDA GPU")


# ---------------------------------------------------------------------------- interrupted work

def job_folders(sweep: Path) -> dict[float, Path]:
    """{alpha: job folder}, from each job's own record of its config."""
    import yaml

    return {float(yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["proxy"]["alpha"]): d
            for d in sweep.iterdir() if (d / ".hydra" / "config.yaml").exists()}


def kill_once(module_and_args, env, ready, limit=240):
    """Start `python -m <module> <args>`; SIGKILL its whole process group as soon as `ready()` holds."""
    proc = subprocess.Popen([sys.executable, "-m", *module_and_args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + limit
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


@pytest.mark.slow
def test_sweep_killed_halfway_resumes_with_the_unfinished_job(tiny_family, proxy_args, tmp_path):
    """Also: job folders are named after the overrides, and long checkpoint paths do not merge two jobs."""
    sweep = tmp_path / "sweep"
    args = ["-m", "proxy.alpha=0,1", *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
            f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_once(["proxy.run", *args], env, lambda: list(sweep.glob("*/result.json")))
    finished = sorted(p.parent.name for p in sweep.glob("*/result.json"))
    assert len(finished) >= 1

    code, out, err = entry("proxy.run", *args)
    assert code == 0, err[-3000:]
    assert out.count("already done, skipping") == len(finished)
    assert out.count("wrote 2 generations") == 2 - len(finished)
    jobs = job_folders(sweep)
    assert sorted(jobs) == [0.0, 1.0] and len(set(jobs.values())) == 2
    assert all((j / "result.json").exists() and (j / "generations.jsonl").exists() for j in jobs.values())


@pytest.mark.slow
def test_training_killed_after_a_checkpoint_resumes_from_it(tiny_family, tmp_path, capsys):
    """Killed for real; the same command again (its body, in this process) resumes and prints the
    checkpoint folder on its last line."""
    job = tmp_path / "job"
    args = ["+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}", f"model={tiny_family.small}",
            "training.max_steps=12", "training.save_steps=2", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=1", "logger=none", f"output_dir={job}",
            f"paths.outputs={tmp_path / 'outputs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = kill_once(["training.sft", *args], env, lambda: list(job.glob("checkpoint-*/trainer_state.json")))
    assert proc.returncode == -signal.SIGKILL and list(job.glob("checkpoint-*"))

    from training.entry import cli_main

    code, err = run_in_process("sft", lambda cfg, _: cli_main(cfg, "sft"), *args)
    out = capsys.readouterr().out
    assert code == 0, err[-3000:]
    assert "resuming from" in out
    model_dir = Path(out.strip().splitlines()[-1])
    metrics = json.loads((model_dir / "card.json").read_text())["metrics"]
    assert metrics["steps"] == 12 and metrics["resumed_from_step"] >= 2


# ---------------------------------------------------------------------------- the registry

def test_corrupt_registry_card(tmp_path, capsys):
    from core import registry
    from core.errors import exit_on_user_error
    from training.registry import main as registry_cli

    for name in ("good-expert", "bad-expert"):
        (tmp_path / name).mkdir()
        registry.register(registry.Card(name=name, path=str(tmp_path / name), tuned_from="tiny-small", task="jsonl",
                                        method={"algorithm": "sft", "adaptation": "full"}))
    bad_card = tmp_path / "bad-expert" / registry.CARD_FILE
    bad_card.write_text('{"name": "bad-expert", "path": ')  # a write cut short

    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(registry_cli)(["show", "bad-expert"])
    assert_one_error_line(exit_.value.code, capsys.readouterr().err, "corrupt", str(bad_card))

    registry_cli(["list"])
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line for line in listing.splitlines()[2:] if line.strip()}
    assert "good-expert" in rows and "CORRUPT" not in rows["good-expert"]
    assert "CORRUPT" in rows["bad-expert"]


# ---------------------------------------------------------------------------- a successful run is quiet

def test_a_successful_proxy_run_prints_no_warning(tiny_family, prompts_file, tmp_path):
    """The last thing a user reads after a run that worked is what it wrote, not a library's warning (a
    deprecated argument would break the run on the transformers that removes it)."""
    code, out, err = entry("proxy.run", f"base={tiny_family.large}", f"expert={tiny_family.expert}",
                           f"anti_expert={tiny_family.small}", f"prompts={prompts_file}", "generation.max_new_tokens=4",
                           f"hydra.run.dir={tmp_path / 'run'}", env={"WANDB_DIR": str(tmp_path)})
    assert code == 0, err
    assert "wrote 2 generations" in out
    warned = [line for line in err.splitlines() if "warn" in line.lower()]
    assert not warned, "\n".join(warned)


def test_a_run_interrupted_mid_way_goes_on_from_the_prompts_it_finished(tiny_family, prompts, tmp_path, monkeypatch):
    """A run killed after some batches (a served base that went away, a lost node), run again, decodes only
    the prompts it had not finished, and writes what an uninterrupted run writes."""
    from proxy.engine import ProxyEngine
    from proxy.run import run

    prompts = prompts + [" the lazy dog", " a b"]  # three batches of two
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = compose_app("proxy", f"base={tiny_family.large}", f"expert={tiny_family.expert}",
                      f"anti_expert={tiny_family.small}", f"prompts={path}", "logger=none",
                      "generation.max_new_tokens=6", "generation.batch_size=2")
    run(cfg, out_dir=str(tmp_path / "whole"))
    batches, real, failure = [], ProxyEngine._generate_batch, [UserError("the base went away")]

    def dies_at_the_third_batch(self, batch, *args, **kwargs):
        batches.append(list(batch))
        if len(batches) == 3:
            raise failure[0]
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(ProxyEngine, "_generate_batch", dies_at_the_third_batch)
    with pytest.raises(UserError, match=r"4 of 6 prompts are saved in .*checkpoint.jsonl: the same command"):
        run(cfg, out_dir=str(tmp_path / "failed"))  # a served base that went away: one line says how to go on
    batches.clear()
    failure[0] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out_dir=str(tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoint.jsonl").exists() and not (tmp_path / "cut" / "generations.jsonl").exists()
    batches.clear()
    run(cfg, out_dir=str(tmp_path / "cut"))
    assert batches == [prompts[4:6]]  # only the last batch was decoded again
    assert (tmp_path / "cut" / "generations.jsonl").read_text() == (tmp_path / "whole" / "generations.jsonl").read_text()
    assert not (tmp_path / "cut" / "checkpoint.jsonl").exists()
