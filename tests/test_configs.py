"""Every config in conf/ composes, resolves and says which command uses it; new files are covered
by walking the folders."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from core.loading import ModelSpec, resolve_spec
from training import common

CONF = Path(__file__).resolve().parent.parent / "conf"
APPS = sorted(p.stem for p in CONF.glob("*.yaml"))
# experiments are composed by a test of their own: each into the app its command names
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))
EXPERIMENTS = sorted((CONF / "experiment").glob("*.yaml"))
ALL_YAML = sorted(CONF.rglob("*.yaml"))
# what an app needs before it resolves (mandatory values)
REQUIRED = {"proxy": ["expert=some/expert"], "sft": ["+task=jsonl"], "dpo": ["+task=jsonl"]}


def _compose(app: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(app, overrides=[*REQUIRED.get(app, []), *overrides])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    return cfg


def _default_groups(app: str) -> set[str]:
    defaults = OmegaConf.load(CONF / f"{app}.yaml").get("defaults") or []
    out = set()
    for d in defaults:
        if isinstance(d, str):
            continue
        for key in d:
            if not str(key).startswith("override"):
                out.add(str(key).split("@")[0])
    return out


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_opens_with_the_command_that_uses_it(path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path} must start with a comment giving the command that uses it"
    assert "python -m" in "\n".join(header), f"{path}: name the command (python -m ...) in its first comment"


@pytest.mark.parametrize("app", APPS)
def test_every_app_composes_with_its_defaults(app):
    cfg = _compose(app, [])
    if app in ("sft", "dpo"):
        # the default training group builds TRL's config: every key is a real option
        args = common.trainer_config(cfg, app, Path("unused"), report_to="none")
        assert args.learning_rate == cfg.training.learning_rate


def _group_cases():
    for group in GROUPS:
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            yield group, option


@pytest.mark.parametrize("group, option", list(_group_cases()), ids=lambda x: str(x))
def test_every_group_option_composes(group, option):
    if group == "presets":  # presets are read by core.loading, not composed into an app
        spec = resolve_spec(option)
        assert isinstance(spec, ModelSpec) and spec.path
        return
    users = [a for a in APPS if group in _default_groups(a)]
    if group == "task":  # kept out of every defaults list so that `+task=x` works
        for app in ("sft", "dpo"):
            cfg = _compose(app, [f"task={option}"] if app in REQUIRED else [f"+task={option}"])
            assert cfg.task.name == option
        return
    if not users:  # a group no app lists by default (e.g. hparams_search): it must compose into one app
        errors = []
        for app in APPS:
            try:
                _compose(app, [f"+{group}={option}"])
                return
            except Exception as err:  # noqa: BLE001 - collected for the message
                errors.append(f"{app}: {err}")
        pytest.fail(f"{group}/{option} composes into no app: {errors}")
    for app in users:
        cfg = _compose(app, [f"{group}={option}"])
        if group == "peft":
            config = common.peft_config(cfg)
            assert (config is None) == (option == "none")
            if config is not None:
                assert isinstance(config.target_modules, (set, list)) or config.target_modules == "all-linear"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_composes_into_the_app_its_command_names(path):
    """`python -m training.<app> +experiment=<name>`, as its header says, composes with nothing more (the
    experiment brings its task and model), TRL takes its settings, and it registers under the file's name."""
    command = re.search(r"python -m training\.(\w+) \+experiment=(\S+)", path.read_text())
    assert command and command[2] == path.stem, f"{path}: name `python -m training.<app> +experiment={path.stem}`"
    app = command[1]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(app, overrides=[f"+experiment={path.stem}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.name == path.stem and cfg.task.name
    args = common.trainer_config(cfg, app, Path("unused"), report_to="none")
    assert args.learning_rate == cfg.training.learning_rate


def test_the_demo_tunes_every_tiny_experiment_with_the_app_it_names(tmp_path):
    from demo import job

    tuning, _ = job.tuning_stages(tmp_path, dpo=True)
    apps = {stage.name: stage.args[0] for stage in tuning}
    named = {p.stem: re.search(r"python -m training\.(\w+)", p.read_text())[1]
             for p in EXPERIMENTS if p.stem.startswith("tiny-")}
    assert apps == named


def test_peft_and_training_options_of_the_training_apps():
    cfg = _compose("dpo", ["peft=qlora"])
    assert common.adaptation(cfg) == "qlora" and cfg.peft.quantization == "nf4"
    assert common.trainer_config(cfg, "dpo", Path("unused"), report_to="none").beta == cfg.training.beta
    assert common.merge_wanted(cfg) and not common.merge_wanted(_compose("sft", []))
