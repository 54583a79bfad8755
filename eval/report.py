"""The gap-closed table, built from finished eval runs.

    python -m eval.report outputs/eval multirun/eval/2026-11-23_10-00-00 [--out report_dir]

Which run is the large base, the small expert, the directly tuned large model and the proxy comes
from the runs' own metrics.json and the registry cards (an expert's card names the model it was
tuned from; a tuned model whose card names the proxy's base is the "directly tuned" reference),
never from typing it again. Gap closed = (proxy - large base) / (large tuned - large base).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from core.errors import UserError, exit_on_user_error
from core.files import atomic_write_json

METRICS_FILE = "metrics.json"


def find_runs(folders: list[str | Path]) -> list[dict[str, Any]]:
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"no such folder '{folder}'; give folders that hold eval runs (metrics.json)")
        for path in sorted(folder.rglob(METRICS_FILE)):
            rec = json.loads(path.read_text())
            rec["run_dir"] = str(path.parent)
            runs.append(rec)
    return runs


def identity(name: str | None) -> str | None:
    """One spelling per model: a registered name, a folder and a preset all become a resolved path."""
    if not name:
        return None
    from core.loading import resolve_spec
    from core.registry import resolve

    path, card = resolve(name)
    if card is not None:
        return os.path.realpath(card.path)
    spec_path = resolve_spec(name).path
    return os.path.realpath(spec_path) if Path(spec_path).exists() else spec_path


def card_of(name: str | None):
    from core.registry import resolve

    return resolve(name)[1] if name else None


def gap_closed(proxy: float, base: float, tuned: float) -> float | None:
    return (proxy - base) / (tuned - base) if tuned != base else None


def evaluation_of(run: dict[str, Any]) -> tuple:
    """What a score was measured on: runs are only compared over the same task, split and examples."""
    return run["task"], run.get("split"), run["metrics"].get("num_examples")


def build_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows: small base, small expert, large base, large tuned, then proxy rows with gap closed.

    The table holds one evaluation: the proxy runs' task, split and number of examples (the one with
    the most examples where the folders hold several, e.g. a quick task.limit run beside a full one).
    Of two runs of one model on it, the later folder wins."""
    proxies = [r for r in runs if r["role"] == "proxy"]
    if not proxies:
        raise UserError("no proxy runs among these folders; evaluate one with python -m eval.run expert=...")
    chosen = max({evaluation_of(r) for r in proxies}, key=lambda e: (e[2] or 0, str(e)))
    runs = [r for r in runs if evaluation_of(r) == chosen]
    metric, task = runs[0]["metric"], chosen[0]
    alone = {identity(r["model"]): r for r in runs if r["role"] == "model"}
    proxies = sorted((r for r in runs if r["role"] == "proxy"),
                     key=lambda r: (str(r.get("expert")), str(r.get("variant")), r["alpha"]))
    rows: list[dict[str, Any]] = []

    def add(kind: str, run: dict | None, model: str | None):
        if run is not None and not any(r["kind"] == kind and r["model"] == model for r in rows):
            rows.append({"kind": kind, "model": model, metric: run["metrics"][metric], "run_dir": run["run_dir"]})

    large = proxies[0]["model"]
    large_id = identity(large)
    tuned = next((r for mid, r in alone.items() if (c := card_of(r["model"])) and identity(c.tuned_from) == large_id
                  and c.task == task), None)
    for p in proxies:
        card = card_of(p["expert"])
        if card is not None:
            add("small base", alone.get(identity(card.tuned_from)), card.tuned_from)
        add("small expert", alone.get(identity(p["expert"])), p["expert"])
    add("large base", alone.get(large_id), large)
    add("large tuned", tuned, tuned["model"] if tuned else None)
    base_score = alone[large_id]["metrics"][metric] if large_id in alone else None
    tuned_score = tuned["metrics"][metric] if tuned else None
    for p in proxies:
        row = {"kind": "proxy", "model": large, "expert": p["expert"], "alpha": p["alpha"],
               metric: p["metrics"][metric], "changed_share": p["metrics"].get("changed_share"),
               "run_dir": p["run_dir"]}
        if p.get("variant"):
            row["variant"] = p["variant"]
        if base_score is not None and tuned_score is not None:
            row["gap_closed"] = gap_closed(row[metric], base_score, tuned_score)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"{'':<14} {'model':<46} {'alpha':>5} {metric:>12} {'gap closed':>10} {'changed':>8}"]
    for r in rows:
        name = r["model"] if r["kind"] != "proxy" else f"{Path(str(r['model'])).name} + {Path(str(r['expert'])).name}"
        if r.get("variant"):
            name += f" ({r['variant']})"
        gap = f"{r['gap_closed'] * 100:.0f}%" if r.get("gap_closed") is not None else ""
        changed = f"{r['changed_share'] * 100:.1f}%" if r.get("changed_share") is not None else ""
        alpha = f"{r['alpha']:g}" if "alpha" in r else ""
        lines.append(f"{r['kind']:<14} {name[-46:]:<46} {alpha:>5} {r[metric] * 100:>11.1f}% {gap:>10} {changed:>8}")
    return "\n".join(lines)


def plot_alpha(rows: list[dict[str, Any]], metric: str, path: Path, title: str = "") -> Path:
    """Score against alpha, one line per expert, with the reference models as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    experts: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "proxy":
            label = Path(str(r["expert"])).name + (f" ({r['variant']})" if r.get("variant") else "")
            experts.setdefault(label, []).append((r["alpha"], r[metric]))
    for label, points in experts.items():
        points.sort()
        ax.plot([a for a, _ in points], [s for _, s in points], marker="o", label=f"proxy: {label}")
    for r, style in ((r, s) for r in rows for k, s in (("large tuned", "--"), ("large base", ":"), ("small expert", "-."))
                     if r["kind"] == k):
        ax.axhline(r[metric], linestyle=style, color="gray", label=f"{r['kind']}: {Path(str(r['model'])).name}")
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(folders: list[str | Path], out_dir: str | Path) -> Path:
    runs = find_runs(folders)
    if not runs:
        raise UserError(f"no finished eval runs (metrics.json) under {', '.join(map(str, folders))}")
    rows = build_table(runs)
    measured = next(r for r in runs if r["run_dir"] == rows[-1]["run_dir"])  # the table's evaluation
    task, metric = measured["task"], measured["metric"]
    out_dir = Path(out_dir)
    print(format_table(rows, metric))
    plot = plot_alpha(rows, metric, out_dir / "alpha_curve.png", title=f"{task}: {metric} against alpha")
    best = max((r for r in rows if r["kind"] == "proxy"), key=lambda r: r[metric])
    report = {"task": task, "split": measured.get("split"), "num_examples": measured["metrics"].get("num_examples"),
              "metric": metric, "rows": rows, "plot": str(plot),
              "best_proxy": {k: best.get(k) for k in ("expert", "alpha", metric, "gap_closed")}}
    path = out_dir / "report.json"
    atomic_write_json(path, report)
    return path


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="folders holding eval runs (searched recursively)")
    parser.add_argument("--out", default="outputs/report")
    args = parser.parse_args(argv)
    print(write_report(args.folders, args.out))


if __name__ == "__main__":
    main()
