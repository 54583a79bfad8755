"""lm-eval's own command line, with the `proxy` model type registered.

    python -m eval.lm_eval_cli --model proxy \
        --model_args base=llama2-70b,expert=tulu-7b,alpha=1.0 --tasks arc_easy --batch_size 8
    python -m eval.lm_eval_cli --model proxy --model_args ... --tasks my_task --include_path my_tasks/

Every `lm_eval` option works as documented; lm-eval 0.4.13 finds models only in its own registry
(no entry points), so the plain `lm_eval` command does not know `proxy`.
"""
from __future__ import annotations

import sys

from proxy.errors import UserError


def main() -> None:
    import eval.lm_eval_proxy  # noqa: F401  registers "proxy"
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
