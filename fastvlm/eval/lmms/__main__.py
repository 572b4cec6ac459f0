"""``python -m fastvlm.eval.lmms ARGS``: register the ``fastvlm`` model with lmms-eval in
this process, then run lmms-eval's command line with ARGS (e.g. ``--model fastvlm
--model_args pretrained=PATH --tasks textvqa_val``). Needed only where the
``lmms_eval.models`` entry point of fastvlm is not installed."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from . import register

    try:
        register()
    except ImportError as e:
        print(f"fastvlm.eval.lmms: {e}", file=sys.stderr)
        return 1
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["lmms-eval", *argv]
    try:  # lmms-eval >= 0.6: the dispatching CLI (subcommands, or the flat eval arguments)
        from lmms_eval.cli.dispatch import main as lmms_main
    except ImportError:  # older lmms-eval
        from lmms_eval.__main__ import cli_evaluate as lmms_main
    lmms_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
