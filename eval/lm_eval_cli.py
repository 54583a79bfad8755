"""lm-eval's own command line, with the `proxy` model type registered.

    python -m eval.lm_eval_cli --model proxy \
        --model_args base=llama2-70b,expert=tulu-7b,alpha=1.0 --tasks arc_easy --batch_size 8
    python -m eval.lm_eval_cli --model proxy --model_args ... --tasks my_task --include_path my_tasks/

Every `lm_eval` option works as documented; lm-eval 0.4.13 finds models only in its own registry
(no entry points), so the plain `lm_eval` command does not know `proxy`.
"""
from __future__ import annotations

import sys

from core.errors import UserError


def named(argv: list[str]) -> list[str]:
    """With `--model proxy`, `--model_args` gain `model=<name>` (unless given): lm-eval names its results
    folder after that key, and would otherwise pick a random name, the same for every proxy configuration."""
    argv = list(argv)
    if "proxy" not in (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"):
        return argv
    from eval.lm_eval_proxy import run_name

    for i, arg in enumerate(argv[:-1]):
        if arg == "--model_args" and "model=" not in argv[i + 1]:
            args = dict(kv.split("=", 1) for kv in argv[i + 1].split(",") if "=" in kv)
            name = run_name(args.get("base", "tiny-large"), args.get("expert"), args.get("alpha", 1.0),
                            args.get("base_quantization"), args.get("plausibility"))
            argv[i + 1] = f"{argv[i + 1]},model={name}"
    return argv


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import eval.lm_eval_proxy  # noqa: F401  registers "proxy"

    sys.argv = [sys.argv[0], *named(sys.argv[1:])]
    try:
        cli_evaluate()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
