"""The main job (`make demo`): the paper's three experiments on the embedded tiny family, ending in the results table.

    python -m demo                 # seed 0: the default world (.cache/tiny-family)
    python -m demo --seeds 1       # another world: its own family, models and registry
    python -m demo --seeds 0 1 2   # the whole job on each, then every number as mean ± sd
    python -m demo --alphas 1      # the proxies at alpha 1 only (default: 0.5 to 1.25)
    python -m demo --jobs 1        # the stages one after another in this process (default: 2 at once)

Per seed: build or reuse the family -> tune the small base into an expert per task (the QA task also with
LoRA and with DPO on top; the chat task with a chat template whose markers are tokens added to the
expert's vocabulary) -> register -> tune the large base directly on each task (the references) ->
evaluate every model and the proxy-tuned large model over a sweep of alpha -> that seed's tables.
The tunings and evaluations are stages (demo/stages.py) that run two at a time on two cores, each
as soon as the models it reads exist; the results are the same with --jobs 1.
Then one report over the seeds: the tables, report.json and a plot (its path on the last line).

Every stage is composed from conf/ with the same overrides a user would type: each tuning is an experiment
of conf/experiment/ (the expert is `python -m training.sft +experiment=tiny-expert paths.outputs=<out>`).
Finished stages are found and skipped on a re-run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from core import CONF_DIR, PROJECT_ROOT
from demo.stages import Stage, StageFailed, run_stages

FAMILY_DIR = Path(os.environ.get("PROXY_FAMILY_DIR", PROJECT_ROOT / ".cache" / "tiny-family"))
ALPHAS = (0.5, 0.75, 1.0, 1.25)  # 1.5 and 2 were never the best on any seed, task or expert
# Each task's full-SFT expert is also swept with proxy.plausibility at contrastive decoding's usual value
# (Li et al., 2023), not tuned here: the paper's rule and the constrained one side by side.
PLAUSIBILITY = 0.1
# The fact task's expert also steers the large base behind this project's server, read through its top K
# log-probabilities only: vLLM's default cap (20) and the paper's API experiment (GPT-3.5's top 5), the
# tokens outside them scored both ways (load.base.outside). Where K covers the vocabulary the output is the
# local engine's, token for token (tests/test_remote.py).
SERVED_TOP_K = (20, 5)
SERVED_OUTSIDE = ("spread", "zero")
# The fact task's expert of another tokenizer family (a Metaspace BPE of 1536 tokens, demo.family.build_other_small),
# tuned as tiny-expert is: it steers the large base through text (proxy.cross), beside the same-tokenizer expert
OTHER_EXPERT = "tiny-other-expert"
SERVED_PORT = 18700  # + the seed and the stage: a fixed address keeps the stage's config, so a re-run skips it
# --scale test, a seconds-long smoke run of the same job: a few steps per tuning, short answers
SCALES = {"full": {"training": [], "max_new_tokens": 48},
          "test": {"training": ["training.max_steps=4"], "max_new_tokens": 16}}
# task -> (its full-SFT expert, the large base tuned directly on it: the reference); each tuning is named
# after its experiment, conf/experiment/<name>.yaml, and registered under that name
TASKS = {
    "tinyworld": ("tiny-expert", "tiny-large-tuned"),
    "tinychat": ("tiny-chat-expert", "tiny-large-chat"),
    "tinymath": ("tiny-math-expert", "tiny-large-math"),
}


PLAN = """[2/5] experts: the small base tuned on each task's tuning people (full SFT); on the QA task also a
      LoRA expert, left unmerged (proxy decoding runs it as its own anti-expert), and DPO on top of the
      SFT expert; the chat expert with role and end-of-turn markers added to its tokenizer, tuned on
      conversations; the math expert on age questions with a worked line before '#### <age>'; on the QA
      task also an expert of another tokenizer family (the small base of a Metaspace BPE, tuned the same way)
[3/5] references: the large base tuned directly on each task, the same way
[4/5] evaluation on held-out people: every model, and the proxy-tuned large model at each alpha (each
      task's full-SFT expert also with proxy.plausibility={plausibility:g}); the fact task's expert also steering
      the large base served at a URL, read through its top {served} log-probabilities; the expert
      of the other tokenizer family steering it through text
      {n} stages, each starting once the models it reads are tuned, in {where}"""


def config(app: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=app, overrides=overrides)


def family_dir(seed: int) -> Path:
    """Seed 0 is the default world the presets and tasks read; another seed's family sits beside it."""
    return FAMILY_DIR if seed == 0 else FAMILY_DIR.with_name(f"{FAMILY_DIR.name}-seed{seed}")


@contextlib.contextmanager
def world_of(seed: int, out: Path):
    """Select a seed's world for everything run inside: its family (PROXY_FAMILY_DIR, which the presets
    and tasks read) and, for a seed other than 0, a registry of its own, so that `tiny-expert` never names
    another world's checkpoint."""
    saved = {k: os.environ.get(k) for k in ("PROXY_FAMILY_DIR", "PROXY_REGISTRY")}
    os.environ["PROXY_FAMILY_DIR"] = str(family_dir(seed))
    if seed != 0:
        os.environ["PROXY_REGISTRY"] = str(out / "registry.json")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(app: str, overrides: list[str]) -> None:
    """One tuning, as `python -m training.<app> <overrides>` runs it (it registers the model)."""
    from training import dpo, sft

    {"sft": sft, "dpo": dpo}[app].run(config(app, overrides))


def evaluate(task: str, name: str, overrides: list[str], out: Path,
             max_new_tokens: int = SCALES["full"]["max_new_tokens"]) -> None:
    from eval.run import evaluate as run_eval

    cfg = config("eval", [f"+task={task}", f"paths.outputs={out}", f"generation.max_new_tokens={max_new_tokens}",
                          "generation.batch_size=100", *overrides])
    run_eval(cfg, out_dir=str(out / "eval" / task / name))


def evaluate_served(task: str, name: str, overrides: list[str], out: Path, max_new_tokens: int, top_k: int,
                    outside: str, port: int) -> None:
    """`evaluate` with the large base served by proxy.serve (its base-alone model) at a URL: what a user whose
    base sits behind an OpenAI-compatible server types, `base=http://HOST:PORT/v1`."""
    import socket

    from proxy.api import create_app
    from proxy.options import generation_settings
    from proxy.serve import running, served_models

    cfg = config("serve", ["base=tiny-large", "expert=tiny-expert", "logger=none"])
    with socket.socket() as sock:  # the fixed port, or (taken) any free one: then a re-run evaluates anew
        port = port if sock.connect_ex(("127.0.0.1", port)) else 0
    models = served_models(cfg)
    try:
        with running(create_app(models, generation_settings(cfg.generation)), port=port) as url:
            evaluate(task, name, [*overrides, f"base={url}/v1", "load.base.model=tiny-large",
                                  "load.base.tokenizer=tiny-large", f"load.base.top_logprobs={top_k}",
                                  f"load.base.outside={outside}"],
                     out, max_new_tokens)
    finally:
        for model in models:
            model.batcher.close()


def tuning_stages(out: Path, dpo: bool, scale: str = "full") -> tuple[list[Stage], dict[str, list[str]]]:
    """Every expert and reference of the seed, as stages named after the registered model; and
    task -> its experts' registered names."""
    extra = SCALES[scale]["training"]

    def tune(experiment: str, app: str = "sft", needs: tuple[str, ...] = ()) -> Stage:
        return Stage(experiment, train, (app, [f"+experiment={experiment}", f"paths.outputs={out}", *extra]), needs)

    experts = {task: [expert] for task, (expert, _) in TASKS.items()}
    # the longest chain first (the QA expert, then DPO on top of it: it reads the expert from this job's
    # outputs), then the large references
    stages = [tune("tiny-expert")]
    if dpo:
        stages.append(tune("tiny-expert-dpo", "dpo", needs=("tiny-expert",)))
        experts["tinyworld"].append("tiny-expert-dpo")
    stages += [tune(reference) for _, reference in TASKS.values()]
    stages += [tune("tiny-chat-expert"), tune("tiny-math-expert"), tune("tiny-expert-lora"), tune(OTHER_EXPERT)]
    experts["tinyworld"].insert(1, "tiny-expert-lora")
    experts["tinyworld"].append(OTHER_EXPERT)
    return stages, experts


def evaluation_stages(out: Path, experts: dict[str, list[str]], alphas=ALPHAS, scale: str = "full",
                      seed: int = 0) -> list[Stage]:
    """Every model of each task, and the proxy-tuned large model at each alpha, on held-out people."""
    tokens = SCALES[scale]["max_new_tokens"]
    tuned = {name for names in experts.values() for name in names} | {ref for _, ref in TASKS.values()}

    def run(task: str, name: str, models: tuple[str, ...], *overrides: str) -> Stage:
        return Stage(f"eval-{task}-{name}", evaluate, (task, name, list(overrides), out, tokens),
                     tuple(m for m in models if m in tuned))

    stages = []
    for task, names in experts.items():
        smalls = ["tiny-small"] + (["tiny-other-small"] if OTHER_EXPERT in names else [])
        for model in (*smalls, *names, "tiny-large", TASKS[task][1]):
            stages.append(run(task, model, (model,), f"model={model}"))
        for name in names:
            for alpha in alphas:
                stages.append(run(task, f"proxy-{name}-a{alpha:g}", (name,), "base=tiny-large", f"expert={name}",
                                  f"proxy.alpha={alpha}"))
        for alpha in alphas:
            stages.append(run(task, f"proxy-{names[0]}-a{alpha:g}-p{PLAUSIBILITY:g}", (names[0],), "base=tiny-large",
                              f"expert={names[0]}", f"proxy.alpha={alpha}", f"proxy.plausibility={PLAUSIBILITY}"))
    stages.append(run("tinyworld", "proxy-tiny-expert-a1-nf4", ("tiny-expert",), "base=tiny-large",
                      "expert=tiny-expert", "proxy.alpha=1.0", "load.base.quantization=nf4"))
    stages.append(run("tinyworld", "proxy-tiny-expert-lora-a1-shared", ("tiny-expert-lora",), "base=tiny-large",
                      "expert=tiny-expert-lora", "proxy.alpha=1.0", "proxy.shared_pair=true"))
    served = [(k, outside) for k in SERVED_TOP_K for outside in SERVED_OUTSIDE]
    for i, (k, outside) in enumerate(served):
        name = f"proxy-tiny-expert-a1-served-top{k}-{outside}"
        stages.append(Stage(f"eval-tinyworld-{name}", evaluate_served,
                            ("tinyworld", name, ["expert=tiny-expert", "proxy.alpha=1.0"], out, tokens, k, outside,
                             SERVED_PORT + 10 * seed + i), ("tiny-expert",)))
    return stages


def run_seed(seed: int, out: Path, scale: str, dpo: bool, alphas=ALPHAS, jobs: int = 1) -> tuple[Path, dict]:
    """The whole job on one seed's world; its report, and how long the family and the job took."""
    from demo.family import build_family, build_other_small
    from eval.report import write_report

    with world_of(seed, out):
        print(f"[1/5] seed {seed}: model family in {family_dir(seed)} (built once, then cached)")
        paths = build_family(family_dir(seed), seed=seed, scale=scale)
        build_other_small(family_dir(seed), seed=seed, scale=scale)
        started = time.time()
        tuning, experts = tuning_stages(out, dpo, scale)
        stages = [*tuning, *evaluation_stages(out, experts, alphas, scale, seed)]
        where = f"{jobs} processes, each stage's output in {out / 'logs'}" if jobs > 1 else "this process"
        print(PLAN.format(n=len(stages), where=where, plausibility=PLAUSIBILITY,
                          served=" and top ".join(map(str, SERVED_TOP_K))))
        run_stages(stages, jobs, out / "logs")
        print(f"[5/5] seed {seed}: report")
        report = write_report([out / "eval"], out / "report")
        build = json.loads(paths["family_json"].read_text()).get("build_seconds")
    return report, {"family_build_seconds": build, "job_seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="worlds to run the job on (default: 0)")
    parser.add_argument("--scale", default="full", choices=["full", "test"], help="test: a seconds-long smoke run")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="stages run at once, each in a process of its own (default: 2 where there are "
                             "2 cores; 1: one after another in this process)")
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO expert")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS),
                        help=f"the proxies' alphas (default: {' '.join(f'{a:g}' for a in ALPHAS)})")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds contention on 2 cores
    # the job's ~45 W&B runs share one environment: W&B's list of every installed package (0.3-0.4 s a run
    # here) is left out of them; WANDB_X_SAVE_REQUIREMENTS=true keeps it
    os.environ.setdefault("WANDB_X_SAVE_REQUIREMENTS", "false")
    started = time.time()
    reports, times = {}, {}
    for seed in args.seeds:
        try:
            reports[seed], times[seed] = run_seed(seed, out / f"seed-{seed}", args.scale, not args.no_dpo,
                                                 args.alphas, args.jobs)
        except StageFailed as exc:  # a worker's traceback is in the stage's log; here, one line naming it
            raise SystemExit(f"error: {exc}") from None
    from eval.report import combine_reports

    print(f"== {len(args.seeds)} seed(s): {', '.join(map(str, args.seeds))}")
    path = combine_reports(reports, out / "report")
    for seed, t in times.items():
        print(f"seed {seed}: family built in {t['family_build_seconds']} s (cached after), job {t['job_seconds']} s")
    print(f"demo finished in {time.time() - started:.0f} s")
    print(path)


if __name__ == "__main__":
    main()
