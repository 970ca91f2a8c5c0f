"""The `promptbake` command: one subcommand per stage.

    promptbake generate --help     sample trajectories from the prompted model
    promptbake train --help        bake them into a LoRA adapter (KL distillation)
    promptbake bake --help         both in one process, with defaults that bake well
    promptbake data squad          fetch a public question set (needs a network)
    promptbake compare --help      is it baked? per-trajectory NLL, bake fidelity
    promptbake eval --help         answer + score questions: base, prompted, baked, re-prompted
    promptbake pursue --help       prompt pursuit: bake again on top of the last bake
    promptbake chat --help         talk to base / prompted / baked in the terminal
    promptbake merge --help        write a merged full model for serving engines

Problems the user can fix print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .configs import GenerateConfig, TrainConfig, add_arguments, from_namespace
from .errors import UserError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str):
    """Register `fn(args)` as a subcommand; `setup(parser)` adds its flags."""

    def wrap(setup):
        def deco(fn):
            COMMANDS[name] = (help, setup, fn)
            return fn

        return deco

    return wrap


def _dataclass_setup(cls):
    return lambda p: add_arguments(p, cls)


@command("generate", "sample trajectories from the prompted model")(
    _dataclass_setup(GenerateConfig)
)
def _generate(args):
    from .generate import run_generate

    run_generate(from_namespace(GenerateConfig, args))


@command("train", "train a LoRA on trajectories (KL to the prompted model)")(
    _dataclass_setup(TrainConfig)
)
def _train(args):
    from .train import run_train

    run_train(from_namespace(TrainConfig, args))


def _bake_setup(p: argparse.ArgumentParser) -> None:
    from .bake import BakeConfig

    add_arguments(p, BakeConfig)


@command("bake", "generate + train in one process: bake a prompt into a LoRA adapter")(_bake_setup)
def _bake(args):
    from .bake import BakeConfig, bake

    bake(from_namespace(BakeConfig, args))


def _data_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["squad", "gsm8k"], help="public question set to fetch")
    p.add_argument(
        "--out_dir", default="data", help="where to write <name>_{train,validation}.jsonl"
    )
    p.add_argument(
        "--max_rows", type=int, default=None, help="keep at most this many rows per split"
    )


@command("data", "fetch a public question set (SQuAD, GSM8K) as JSONL")(_data_setup)
def _data(args):
    from .fetch import fetch_dataset

    for path in fetch_dataset(args.name, args.out_dir, max_rows=args.max_rows):
        print(f"wrote {path}")


# ---------------------------------------------------------------- evaluation (is it baked?)
def _lazy_setup(module: str, cls_name: str):
    """Flags from a config dataclass in `module`, imported only when the parser is built."""

    def setup(p: argparse.ArgumentParser) -> None:
        import importlib

        add_arguments(p, getattr(importlib.import_module(module, __package__), cls_name))

    return setup


def _lazy_run(module: str, cls_name: str, fn_name: str):
    def run(args):
        import importlib

        mod = importlib.import_module(module, __package__)
        getattr(mod, fn_name)(from_namespace(getattr(mod, cls_name), args))

    return run


for _name, _help, _mod, _cls, _fn in (
    ("compare", "per-trajectory NLL: base/baked x with/without prompt", ".compare",
     "CompareConfig", "compare"),
    ("eval", "answer and score questions as base, prompted, baked, re-prompted", ".evals",
     "EvalConfig", "evaluate_command"),
    ("pursue", "prompt pursuit: bake the prompt again on top of each bake", ".pursue",
     "PursueConfig", "pursue"),
    ("chat", "interactive chat: switch between base, prompted and baked", ".repl",
     "ChatConfig", "chat"),
    ("merge", "merge an adapter into a full model directory", ".adapters",
     "MergeConfig", "merge"),
):  # fmt: skip
    command(_name, _help)(_lazy_setup(_mod, _cls))(_lazy_run(_mod, _cls, _fn))


def build_parser(prog: str = "promptbake", only: str | None = None) -> argparse.ArgumentParser:
    """The full CLI, or (``only``) one subcommand's flags as a standalone script."""
    if only is not None:
        help_, setup, _ = COMMANDS[only]
        p = argparse.ArgumentParser(prog=prog, description=help_)
        setup(p)
        return p
    p = argparse.ArgumentParser(
        prog=prog, description="Prompt Baking: turn a prompt into LoRA weights."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, setup, _) in COMMANDS.items():
        setup(sub.add_parser(name, help=help_, description=help_))
    return p


def main(argv: list[str] | None = None, prog: str = "promptbake", only: str | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser(prog, only).parse_args(argv)
    name = only or args.command
    try:
        COMMANDS[name][2](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: partial output is kept and the same command resumes it", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
