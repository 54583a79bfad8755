"""The gap-closed table, built from finished eval runs; and the same table over several seeds.

    python -m eval.report outputs/eval multirun/eval/2026-11-23_10-00-00 [--out report_dir]
    python -m eval.report --combine outputs/demo/seed-*/report/report.json --out outputs/demo/report

Which run is the large base, the small expert, the directly tuned large model and the proxy comes
from the runs' own metrics.json and the registry cards (an expert's card names the model it was
tuned from; a tuned model whose card names the proxy's base is the "directly tuned" reference),
never from typing it again. Gap closed = (proxy - large base) / (large tuned - large base). Runs of
several tasks give one table per task. `--combine` reads the reports of the same job run on several
seeds (worlds) and gives every number as mean ± sd over them, with each seed's value kept.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
    """Rows of one task: small base, small expert, large base, large tuned, then proxy rows with gap closed.

    The table holds one evaluation: the proxy runs' task, split and number of examples (the one with
    the most examples where the folders hold several, e.g. a quick task.limit run beside a full one).
    Of two runs of one model on it, the later folder wins."""
    proxies = [r for r in runs if r["role"] == "proxy"]
    if not proxies:
        task = f" of task '{runs[0]['task']}'" if runs else ""
        raise UserError(f"no proxy runs{task} among these folders; evaluate one with python -m eval.run expert=...")
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


def build_tables(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One table per task that has proxy runs, in the order the tasks first appear:
    {task: {"metric", "split", "num_examples", "rows", "best_proxy"}}."""
    tables: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(r["task"] for r in runs if r["role"] == "proxy"):
        rows = build_table([r for r in runs if r["task"] == task])
        measured = next(r for r in runs if r["run_dir"] == rows[-1]["run_dir"])  # the table's evaluation
        metric = measured["metric"]
        best = max((r for r in rows if r["kind"] == "proxy"), key=lambda r: r[metric])
        tables[task] = {"metric": metric, "split": measured.get("split"),
                        "num_examples": measured["metrics"].get("num_examples"), "rows": rows,
                        "best_proxy": {k: best.get(k) for k in ("expert", "alpha", metric, "gap_closed")}}
    if not tables:
        raise UserError("no proxy runs among these folders; evaluate one with python -m eval.run expert=...")
    return tables


# ---------------------------------------------------------------- several seeds


def _label(row: dict[str, Any]) -> str:
    """What a row is, the same in every seed's report: kind, model and expert names, variant."""
    name = Path(str(row["model"])).name
    if row["kind"] == "proxy":
        name += f" + {Path(str(row['expert'])).name}"
    return f"{row['kind']}|{name}|{row.get('variant') or ''}"


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def combine_rows(per_seed: dict[int, list[dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    """Rows matched across seeds by what they are; each number becomes its mean, sd and per-seed values.
    A row missing from a seed's report is left out."""
    seeds = list(per_seed)
    by_key = [{(_label(r), r.get("alpha")): r for r in rows} for rows in per_seed.values()]
    combined = []
    for key, first in by_key[0].items():
        if not all(key in table for table in by_key):
            continue
        row = {k: first[k] for k in ("kind", "model", "expert", "alpha", "variant") if first.get(k) is not None}
        for field in (metric, "gap_closed", "changed_share"):
            values = [table[key].get(field) for table in by_key]
            if any(v is None for v in values):
                continue
            row[field], row[f"{field}_sd"] = mean_sd(values)
            row[f"{field}_per_seed"] = dict(zip(seeds, values))
        combined.append(row)
    return combined


def best_alphas(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per expert (and variant): the gap closed at each seed's own best alpha, and the alpha best on average."""
    best = []
    for label in dict.fromkeys(_label(r) for r in rows if r["kind"] == "proxy"):
        group = [r for r in rows if r["kind"] == "proxy" and _label(r) == label]
        top = max(group, key=lambda r: r[metric])
        entry = {"expert": top["expert"], "variant": top.get("variant"), "alpha": top["alpha"],
                 metric: top[metric], f"{metric}_sd": top.get(f"{metric}_sd"), "gap_closed": top.get("gap_closed")}
        if all("gap_closed_per_seed" in r for r in group):
            seeds = group[0]["gap_closed_per_seed"]
            each = {s: max(r["gap_closed_per_seed"][s] for r in group) for s in seeds}
            entry["best_gap_closed_per_seed"] = each
            entry["best_gap_closed"], entry["best_gap_closed_sd"] = mean_sd(list(each.values()))
        best.append(entry)
    return best


def combine_reports(paths: dict[int, str | Path], out_dir: str | Path) -> Path:
    """One report over several seeds' reports (seed -> report.json): every task's rows as mean ± sd."""
    reports = {seed: json.loads(Path(p).read_text()) for seed, p in paths.items()}
    first = next(iter(reports.values()))
    tables = {}
    for task, table in first["tasks"].items():
        if not all(task in r["tasks"] for r in reports.values()):
            continue
        metric = table["metric"]
        rows = combine_rows({s: r["tasks"][task]["rows"] for s, r in reports.items()}, metric)
        tables[task] = {"metric": metric, "rows": rows, "best": best_alphas(rows, metric)}
    out_dir = Path(out_dir)
    print(format_tables(tables, seeds=list(reports)))
    plot = plot_tasks(tables, out_dir / "alpha_curve.png")
    path = out_dir / "report.json"
    atomic_write_json(path, {"seeds": list(reports), "tasks": tables, "plot": str(plot),
                             "reports": {str(s): str(p) for s, p in paths.items()}})
    return path


# ---------------------------------------------------------------- text and plot


def _percent(row: dict[str, Any], field: str, digits: int) -> str:
    if row.get(field) is None:
        return ""
    sd = row.get(f"{field}_sd")
    text = f"{row[field] * 100:.{digits}f}"
    return f"{text} ± {sd * 100:.{digits}f}%" if sd is not None else f"{text}%"


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    names = []
    for r in rows:
        name = str(r["model"]) if r["kind"] != "proxy" else f"{Path(str(r['model'])).name} + {Path(str(r['expert'])).name}"
        names.append(name + (f" ({r['variant']})" if r.get("variant") else ""))
    width = min(max([46, *map(len, names)]), 64)  # a long path keeps its end
    lines = [f"{'':<14} {'model':<{width}} {'alpha':>5} {metric:>16} {'gap closed':>12} {'changed':>8}"]
    for r, name in zip(rows, names):
        changed = f"{r['changed_share'] * 100:.1f}%" if r.get("changed_share") is not None else ""
        alpha = f"{r['alpha']:g}" if r.get("alpha") is not None else ""
        lines.append(f"{r['kind']:<14} {name[-width:]:<{width}} {alpha:>5} {_percent(r, metric, 1):>16} "
                     f"{_percent(r, 'gap_closed', 0):>12} {changed:>8}")
    return "\n".join(lines)


def format_tables(tables: dict[str, dict[str, Any]], seeds: list[int] | None = None) -> str:
    """Every task's table, one after the other; over several seeds, each one's best-alpha gap closed."""
    blocks = []
    for task, table in tables.items():
        over = f", mean ± sd over seeds {', '.join(map(str, seeds))}" if seeds and len(seeds) > 1 else ""
        lines = [f"== {task} ({table['metric']}{over})", format_table(table["rows"], table["metric"])]
        for b in table.get("best") or []:
            if "best_gap_closed_per_seed" in b:
                each = ", ".join(f"{v * 100:.0f}%" for v in b["best_gap_closed_per_seed"].values())
                name = Path(str(b["expert"])).name + (f" ({b['variant']})" if b.get("variant") else "")
                lines.append(f"   best alpha, {name}: gap closed {_percent(b, 'best_gap_closed', 0)} (seeds: {each})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _draw_alpha(ax, rows: list[dict[str, Any]], metric: str, title: str) -> None:
    """Score against alpha, one line per expert (error bars where rows carry an sd), references as lines."""
    experts: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "proxy":
            label = Path(str(r["expert"])).name + (f" ({r['variant']})" if r.get("variant") else "")
            experts.setdefault(label, []).append((r["alpha"], r[metric], r.get(f"{metric}_sd") or 0.0))
    for label, points in experts.items():
        points.sort()
        ax.errorbar([a for a, _, _ in points], [s for _, s, _ in points], yerr=[e for _, _, e in points],
                    marker="o", capsize=3, label=f"proxy: {label}")
    for r, style in ((r, s) for r in rows for k, s in (("large tuned", "--"), ("large base", ":"), ("small expert", "-."))
                     if r["kind"] == k):
        ax.axhline(r[metric], linestyle=style, color="gray", label=f"{r['kind']}: {Path(str(r['model'])).name}")
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def plot_alpha(rows: list[dict[str, Any]], metric: str, path: Path, title: str = "") -> Path:
    return _figure([(rows, metric, title)], path)


def plot_tasks(tables: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per task: score against alpha."""
    return _figure([(t["rows"], t["metric"], f"{task}: {t['metric']} against alpha") for task, t in tables.items()],
                   path)


def _figure(panels: list[tuple[list, str, str]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 4.5 * len(panels)), squeeze=False)
    for ax, (rows, metric, title) in zip(axes[:, 0], panels):
        _draw_alpha(ax, rows, metric, title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(folders: list[str | Path], out_dir: str | Path) -> Path:
    """Every task's gap-closed table from the finished runs under `folders`: printed, report.json, a plot."""
    runs = find_runs(folders)
    if not runs:
        raise UserError(f"no finished eval runs (metrics.json) under {', '.join(map(str, folders))}")
    tables = build_tables(runs)
    out_dir = Path(out_dir)
    print(format_tables(tables))
    plot = plot_tasks(tables, out_dir / "alpha_curve.png")
    path = out_dir / "report.json"
    atomic_write_json(path, {"tasks": tables, "plot": str(plot)})
    return path


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", help="folders holding eval runs (searched recursively)")
    parser.add_argument("--combine", nargs="+", metavar="REPORT",
                        help="report.json files of the same job on several seeds (its seed-N folder names the seed)")
    parser.add_argument("--out", default="outputs/report")
    args = parser.parse_args(argv)
    if bool(args.folders) == bool(args.combine):
        raise UserError("give either folders of eval runs or --combine with several seeds' report.json files")
    if args.combine:
        print(combine_reports({seed_of(p, i): p for i, p in enumerate(args.combine)}, args.out))
    else:
        print(write_report(args.folders, args.out))


def seed_of(path: str | Path, default: int) -> int:
    """The seed a report belongs to: the N of a `seed-N` folder on its path, else its position."""
    for part in reversed(Path(path).parts):
        if part.startswith("seed-") and part[5:].isdigit():
            return int(part[5:])
    return default


if __name__ == "__main__":
    main()
