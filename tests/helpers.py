"""Helpers shared by test modules: composing a training config the way the Hydra apps do."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# small, fast, deterministic: fp32, no checkpointing, a high learning rate so a few steps show
FAST = [
    "logger=none", "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
    "training.logging_steps=1", "training.learning_rate=1e-3", "training.activation_checkpointing=false",
    "training.warmup_steps=0", "training.max_length=64", "training.lr_scheduler_type=constant",
    "+training.args.disable_tqdm=true",
]


def make_cfg(app: str, model: str, outputs: Path, *overrides: str, steps: int = 4):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(app, overrides=[f"model={model}", f"paths.outputs={outputs}",
                                       f"training.max_steps={steps}", *FAST, *overrides])


def compose_app(app: str, *overrides: str):
    """A stage's config as its Hydra app composes it from the command line's overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(app, overrides=list(overrides))


def run_in_process(app: str, run, *overrides: str, out_dir: str | None = None) -> tuple[int, str]:
    """A stage's command line, in this process: its config composed from the overrides and its body run
    as its `main` runs it (a UserError becomes `error: ...` and exit status 2). Returns (exit status,
    everything it wrote to stderr)."""
    import contextlib
    import io

    from core.errors import exit_on_user_error

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            exit_on_user_error(lambda: run(compose_app(app, *overrides), out_dir))()
        return 0, err.getvalue()
    except SystemExit as exit_:
        return int(exit_.code or 0), err.getvalue()


def assert_one_error_line(code: int, stderr: str, *fragments: str) -> str:
    """Exit status 2, no traceback, and stderr ending in one `error: ...` line holding every fragment."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, (code, stderr[-3000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def steering(base, models: dict, alpha: float, k=None):
    """`base` steered by models["expert"] against models["small"], with models["tok"]: the plain engine, or
    the speculative one drafting k tokens a round."""
    from proxy.engine import ProxyEngine, SteeringPair
    from proxy.speculative import SpeculativeProxyEngine

    pair = [SteeringPair(models["expert"], models["small"], alpha)]
    if k is None:
        return ProxyEngine(base, models["tok"], pair)
    return SpeculativeProxyEngine(base, models["tok"], pair, k=k)


SERVED_PROMPTS = [" the quick brown", " Question: where was the person born?\nAnswer:", " a b c", " the lazy dog"]


def assert_served_gives_the_local_tokens(served, base, models: dict, k, max_new_tokens: int) -> None:
    """Greedy proxy output over a served base is the local engine's over the same weights (`base`), token for
    token, at alpha 0, 0.5, 1 and 2, batch 1 and 4; one request per row a round (a speculative round's is one
    echo), and fewer than one a token where drafts were accepted."""
    from proxy.engine import GenerationSettings

    for alpha in (0.0, 0.5, 1.0, 2.0):
        for batch, prompts in ((1, SERVED_PROMPTS[:2]), (4, SERVED_PROMPTS)):
            settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch)
            want = token_ids(steering(base, models, alpha, k).generate(prompts, settings))
            engine = steering(served, models, alpha, k)
            assert token_ids(engine.generate(prompts, settings)) == want, (alpha, batch)
            stats = engine.last_stats
            assert stats.base_requests == stats.row_forwards and stats.requests_per_token > 0
            if k is not None and stats.accepted:
                assert stats.requests_per_token < 1.0


def token_ids(generations) -> list[list[int]]:
    return [g.token_ids for g in generations]
