"""The registry's command line: what is registered, with lineage and scores, and one card in full.

    python -m training.registry list
    python -m training.registry show <name>

The registry itself (cards, the index, name resolution) is core.registry.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from core.errors import UserError, exit_on_user_error
from core.registry import entries, read_card, registry_path, resolve


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.registry", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered checkpoints")
    show = sub.add_parser("show", help="print one card")
    show.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "show":
        path, card = resolve(args.name)
        if card is None:
            raise UserError(f"'{args.name}' is not a registered name nor a checkpoint folder with a card")
        print(json.dumps(asdict(card), indent=2, default=str))
        return
    rows = [["name", "task", "method", "tuned from", "scores", "path"]]
    for name, entry in sorted(entries().items()):
        try:
            card = read_card(Path(entry["card"]).parent)
        except UserError as err:
            rows.append([name, "-", "-", "-", "-", f"CORRUPT: {err}"])
            continue
        if card is None:
            rows.append([name, entry.get("task", "-"), "-", entry.get("tuned_from", "-"), "-", "MISSING card"])
            continue
        method = " ".join([str(card.method.get("algorithm", "-")), str(card.method.get("adaptation", ""))]
                          + (["merged"] if card.method.get("merged") else [])).strip()
        scores = ", ".join(
            f"{t} " + " ".join(f"{k}={v:.3g}" for k, v in s.items() if isinstance(v, (int, float)) and k != "num_examples")
            + (f" (n={s['num_examples']})" if "num_examples" in s else "") for t, s in card.scores.items())
        rows.append([name, card.task, method, card.tuned_from, scores or "-", card.path])
    print(f"registry: {registry_path()}")
    print(_table(rows) if len(rows) > 1 else "(empty)")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends the listing quietly
    main(sys.argv[1:])
