"""The fault drill: bad input and faults through the real entry points end with exit status 2 and ONE
`error: ...` line (no traceback), and interrupted work resumes where it stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def entry(module: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and stderr ending in one `error: ...` line holding every fragment."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture
def prompts_file(tmp_path, prompts):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:2]))
    return path


@pytest.fixture
def proxy_args(tiny_family, prompts_file):
    return [f"base={tiny_family.large}", f"prompts={prompts_file}", "logger=none", "generation.max_new_tokens=4"]


# ---------------------------------------------------------------------------- bad input to proxy.run

def test_mismatched_tokenizers(tiny_family, proxy_args):
    proc = entry("proxy.run", *proxy_args, f"expert={tiny_family.foreign}", f"anti_expert={tiny_family.small}")
    assert_one_error_line(proc, "tokenizer", "does not match")


def test_missing_checkpoint_path(tiny_family, proxy_args):
    proc = entry("proxy.run", *proxy_args, "expert=/nonexistent/checkpoint", f"anti_expert={tiny_family.small}")
    assert_one_error_line(proc, "'/nonexistent/checkpoint' does not exist")


def test_unknown_registered_name(proxy_args, tmp_path):
    env = {"PROXY_REGISTRY": str(tmp_path / "registry.json")}
    assert_one_error_line(entry("proxy.run", *proxy_args, "expert=no-such-expert", env=env), "'no-such-expert'")
    assert_one_error_line(entry("training.registry", "show", "no-such-expert", env=env), "'no-such-expert'")


def test_shared_pair_checks_the_adapter_and_its_tokenizer(tiny_family, proxy_args, tmp_path):
    """proxy.shared_pair: an adapter over a model with another tokenizer, and a merged (adapter-less) expert."""
    from peft import LoraConfig, get_peft_model

    from proxy.loading import load_model

    adapter = tmp_path / "foreign_lora"
    get_peft_model(load_model(tiny_family.foreign), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    proc = entry("proxy.run", *proxy_args, f"expert={adapter}", f"anti_expert={tiny_family.foreign}",
                 "proxy.shared_pair=true")
    assert_one_error_line(proc, "tokenizer", "does not match")
    proc = entry("proxy.run", *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                 "proxy.shared_pair=true")
    assert_one_error_line(proc, "holds no LoRA adapter", "training.merge=false")


@pytest.mark.parametrize("alpha", ["nan", "inf"])
def test_non_finite_alpha(tiny_family, proxy_args, alpha):
    proc = entry("proxy.run", *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                 f"proxy.alpha={alpha}")
    assert_one_error_line(proc, "alpha must be a finite number")


def test_non_numeric_alpha(tiny_family, proxy_args):
    proc = entry("proxy.run", *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
                 "proxy.alpha=abc")
    assert_one_error_line(proc, "alpha", "abc")


def test_over_long_prompt(tiny_family, proxy_args, tmp_path):
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": " the" * 400}) + "\n")
    proc = entry("proxy.run", *proxy_args, f"prompts={long_prompts}", f"expert={tiny_family.expert}",
                 f"anti_expert={tiny_family.small}")
    assert_one_error_line(proc, "exceeds the model's context")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("option, fragment", [("load.base.device_map=cuda", "device_map=cuda"),
                                              ("load.base.quantization=int8", "quantization=int8")])
def test_gpu_only_option_on_the_cpu(tiny_family, proxy_args, option, fragment):
    proc = entry("proxy.run", *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}", option)
    assert_one_error_line(proc, fragment, "needs a CUDA GPU")


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
    deadline = time.time() + limit
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


@pytest.mark.slow
def test_sweep_killed_halfway_resumes_with_the_unfinished_job(tiny_family, proxy_args, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "proxy.alpha=0,1", *proxy_args, f"expert={tiny_family.expert}", f"anti_expert={tiny_family.small}",
            f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_once(["proxy.run", *args], env, lambda: list(sweep.glob("*/result.json")))
    finished = sorted(p.parent.name for p in sweep.glob("*/result.json"))
    assert len(finished) >= 1

    rerun = entry("proxy.run", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already done, skipping") == len(finished)
    assert rerun.stdout.count("wrote 2 generations") == 2 - len(finished)
    jobs = job_folders(sweep)
    assert sorted(jobs) == [0.0, 1.0]
    assert all((j / "result.json").exists() and (j / "generations.jsonl").exists() for j in jobs.values())


def test_sweep_jobs_with_long_paths_get_distinct_folders(tiny_family, proxy_args, tmp_path):
    """Job folders are named after the overrides; long checkpoint paths must not merge two jobs."""
    sweep = tmp_path / "sweep"
    proc = entry("proxy.run", "-m", "proxy.alpha=0,1", *proxy_args, f"expert={tiny_family.expert}",
                 f"anti_expert={tiny_family.small}", "generation.max_new_tokens=1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([d for d in sweep.iterdir() if (d / "result.json").exists()]) == 2, sorted(p.name for p in sweep.iterdir())


@pytest.mark.slow
def test_training_killed_after_a_checkpoint_resumes_from_it(tiny_family, tmp_path):
    if not (ROOT / "training" / "sft.py").exists():
        pytest.skip("training/sft.py is not there yet")
    job = tmp_path / "job"
    args = ["+task=jsonl", f"task.path={FIXTURES / 'plain.jsonl'}", f"model={tiny_family.small}",
            "training.max_steps=30", "training.save_steps=2", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=1", "logger=none", f"output_dir={job}",
            f"paths.outputs={tmp_path / 'outputs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROXY_REGISTRY": str(tmp_path / "registry.json")}
    proc = kill_once(["training.sft", *args], env, lambda: list(job.glob("checkpoint-*/trainer_state.json")))
    assert proc.returncode == -signal.SIGKILL and list(job.glob("checkpoint-*"))

    rerun = entry("training.sft", *args, env={"PROXY_REGISTRY": str(tmp_path / "registry.json")})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    model_dir = Path(rerun.stdout.strip().splitlines()[-1])
    metrics = json.loads((model_dir / "card.json").read_text())["metrics"]
    assert metrics["steps"] == 30 and metrics["resumed_from_step"] >= 2


# ---------------------------------------------------------------------------- the registry

def test_corrupt_registry_card(tmp_path, monkeypatch):
    from training import registry

    monkeypatch.setenv("PROXY_REGISTRY", str(tmp_path / "registry.json"))
    for name in ("good-expert", "bad-expert"):
        (tmp_path / name).mkdir()
        registry.register(registry.Card(name=name, path=str(tmp_path / name), tuned_from="tiny-small", task="jsonl",
                                        method={"algorithm": "sft", "adaptation": "full"}))
    bad_card = tmp_path / "bad-expert" / registry.CARD_FILE
    bad_card.write_text('{"name": "bad-expert", "path": ')  # a write cut short

    env = {"PROXY_REGISTRY": str(tmp_path / "registry.json")}
    assert_one_error_line(entry("training.registry", "show", "bad-expert", env=env), "corrupt", str(bad_card))

    listing = entry("training.registry", "list", env=env)
    assert listing.returncode == 0, listing.stderr[-3000:]
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[2:] if line.strip()}
    assert "good-expert" in rows and "CORRUPT" not in rows["good-expert"]
    assert "CORRUPT" in rows["bad-expert"]
