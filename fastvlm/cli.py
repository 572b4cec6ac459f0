"""The `fastvlm` command line. Thin: each subcommand lives in the module that does the work.

A command module exposes `add_arguments(parser)` and `run(args) -> int`, and imports
torch only inside `run`, so `fastvlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Nested groups (e.g. `data synth`) are "group:sub".
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("fastvlm.commands.generate", "answer a prompt about one or more images"),
    "chat": ("fastvlm.commands.chat", "interactive multi-turn chat in the terminal"),
    "info": ("fastvlm.commands.info", "show a model's config, parameter counts and visual tokens"),
    "init": ("fastvlm.commands.init", "write a model of a preset size with random weights (no download)"),
    "convert": ("fastvlm.commands.convert", "convert a checkpoint between the Apple, transformers and fastvlm layouts"),
    "bench": ("fastvlm.bench.cli", "measure encoding, prefill, TTFT and decode speed"),
    "train": ("fastvlm.train.cli", "train or fine-tune from a recipe file"),
    "eval": ("fastvlm.eval.cli", "evaluate on a benchmark or a LLaVA-format file"),
    "serve": ("fastvlm.serve.cli", "serve an OpenAI-compatible chat API and a web page"),
    "data:synth": ("fastvlm.data.cli", "generate the synthetic text-rich visual QA dataset"),
    "data:tokenizer": ("fastvlm.data.tokenizer_cli", "train a byte-level BPE tokenizer on a dataset's text"),
}

def missing_package_message(command: str, error: ModuleNotFoundError) -> str | None:
    """The one-line CLI error for an optional package that is not installed, or None for any other missing module."""
    from .errors import missing_package_hint

    hint = missing_package_hint(error)
    return None if hint is None else f"fastvlm {command}: error: this needs {hint}"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastvlm",
        description="FastVLM: fast vision-language inference, training, evaluation, serving and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"fastvlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("fastvlm"):
                continue  # command not built yet in this checkout
            raise
        if ":" in name:
            group, leaf = name.split(":", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND", required=True)
            p = groups[group].add_parser(leaf, help=help_text, description=module.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        else:
            p = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _prog=name.replace(":", " "))
    return parser


def error_message(error: BaseException) -> str:
    """The error's own message; for one raised in a DataLoader worker, which PyTorch re-raises with the worker's
    whole traceback as its message, the original message alone."""
    message = str(error)
    if "Original Traceback (most recent call last)" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        name = f"{type(error).__module__}.{type(error).__qualname__}: "
        message = last[len(name):] if last.startswith(name) else last
    return message


_warning_command = {"name": None}  # the running command, for the one-line warning format (installed once)


def _one_line_warnings(command: str) -> None:
    """Our own warnings as one line ("fastvlm generate: warning: ..."), not Python's file:line + source format;
    other packages' warnings keep theirs (their location is what a bug report needs)."""
    import warnings

    first = _warning_command["name"] is None
    _warning_command["name"] = command
    if not first:
        return
    package = os.path.dirname(os.path.abspath(__file__))
    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package + os.sep):
            return f"fastvlm {_warning_command['name']}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone away (poll reports an error on it)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    from .errors import FastVLMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    command = getattr(args, "_prog", args.command)  # "data synth", as argparse names it in its own errors
    _one_line_warnings(command)
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a reader that went away is handled below
        return code
    except FastVLMError as e:
        print(f"fastvlm {command}: error: {error_message(e)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        message = missing_package_message(command, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        if not _stdout_gone():  # another pipe (a worker's, a socket's): an error like any other
            print(f"fastvlm {command}: error: {e}", file=sys.stderr)
            return 1
        # stdout's reader went away (`fastvlm info | head -3`): stop quietly, and keep Python's exit-time flush
        # of stdout from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
