"""At the end of a Hydra multirun of eval.run: one table over its jobs and a plot of score against
alpha per expert, written into the sweep folder and logged to W&B."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from core.files import atomic_write_json
from eval.report import find_runs, plot_alpha


def summarize(sweep_dir: str | Path) -> dict[str, Any] | None:
    runs = find_runs([sweep_dir])
    if not runs:
        return None
    metric = runs[0]["metric"]
    rows = [{"job": Path(r["run_dir"]).name, "kind": r["role"] if r["role"] == "model" else "proxy",
             "model": r["model"], "expert": r.get("expert"), "alpha": r.get("alpha"),
             "variant": r.get("variant"), metric: r["metrics"][metric],
             "changed_share": r["metrics"].get("changed_share")} for r in runs]
    lines = [f"| job | expert | alpha | {metric} | changed |", "|---|---|---|---|---|"]
    for r in rows:
        changed = f"{r['changed_share']:.3f}" if r.get("changed_share") is not None else ""
        lines.append(f"| {r['job']} | {r['expert'] or r['model']} | {r['alpha'] if r['alpha'] is not None else ''} "
                     f"| {r[metric]:.4f} | {changed} |")
    sweep_dir = Path(sweep_dir)
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    plot = plot_alpha([r for r in rows if r["kind"] == "proxy"], metric, sweep_dir / "alpha_curve.png",
                      title=f"{runs[0]['task']}: {metric} against alpha")
    summary = {"task": runs[0]["task"], "metric": metric, "rows": rows, "plot": str(plot)}
    atomic_write_json(sweep_dir / "summary.json", summary)
    return summary


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        summary = summarize(sweep_dir)
        if summary is None:
            return
        print((Path(sweep_dir) / "summary.md").read_text(), end="")
        print(f"sweep summary: {Path(sweep_dir) / 'summary.json'} and {summary['plot']}")
        from core.tracking import tracked

        with tracked(config, job_type="sweep-summary", run_dir=str(sweep_dir)) as tracker:
            tracker.table("sweep", summary["rows"])
            tracker.image("alpha_curve", summary["plot"])
