"""The demo's stage runner (demo/stages.py): stages in worker processes, each after what it needs."""
from __future__ import annotations

from pathlib import Path

import pytest

from demo.stages import Stage, StageFailed, run_stages


def write(folder: str, name: str, needs: tuple[str, ...] = ()) -> None:
    """A stage: fails unless the stages it needs have written their files, then writes its own."""
    missing = [n for n in needs if not (Path(folder) / n).exists()]
    print(f"{name} ran")  # lands in the stage's log
    if missing:
        raise RuntimeError(f"{name} ran before {missing}")
    (Path(folder) / name).write_text(name)


def fail(message: str) -> None:
    print("about to fail")
    raise ValueError(message)


def chain(folder: Path) -> list[Stage]:
    def stage(name, *needs):
        return Stage(name, write, (str(folder), name, needs), needs)

    return [stage("a"), stage("b", "a"), stage("c"), stage("d", "b", "c"), stage("e")]


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_stage_runs_once_after_what_it_needs(tmp_path, jobs):
    lines = []
    seconds = run_stages(chain(tmp_path), jobs, tmp_path / "logs", report=lines.append)
    assert sorted(seconds) == ["a", "b", "c", "d", "e"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a", "b", "c", "d", "e"]
    assert len(lines) == 5 and all(line.endswith(" s") for line in lines)
    if jobs > 1:  # each stage's output in its own log
        assert (tmp_path / "logs" / "d.log").read_text() == "d ran\n"


def test_a_failed_stage_names_its_log_and_starts_nothing_after_it(tmp_path):
    stages = [Stage("bad", fail, ("no such checkpoint",)),
              Stage("after", write, (str(tmp_path), "after"), ("bad",))]
    with pytest.raises(StageFailed, match="stage bad failed: no such checkpoint; its output: .*bad.log"):
        run_stages(stages, 2, tmp_path / "logs", report=lambda line: None)
    assert "about to fail" in (tmp_path / "logs" / "bad.log").read_text()
    assert not (tmp_path / "after").exists()


@pytest.mark.parametrize("stages, message", [
    ([Stage("a", print), Stage("a", print)], "two stages are named 'a'"),
    ([Stage("b", print, (), ("a",)), Stage("a", print)], "needs \\['a'\\], which no earlier stage is"),
])
def test_an_order_no_worker_could_follow_is_refused(tmp_path, stages, message):
    with pytest.raises(ValueError, match=message):
        run_stages(stages, 2, tmp_path, report=print)
