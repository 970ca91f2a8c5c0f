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

Every command takes ``--config FILE`` (YAML or JSON, keys = flag names; see flags.py).
Problems the user can fix print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import configs
from .adapters import base_model_name
from .errors import Interrupted, UserError, sigterm_as_interrupt
from .flags import add_arguments, add_config_flag, config_values, from_namespace, read_config_file
from .models import is_hub_name, no_unasked_network

# name, help, config class (the configs package), "module:function" run with the config; the
# command's module is imported only when it runs, so --help stays quick
COMMANDS: tuple[tuple[str, str, type, str], ...] = (
    ("generate", "sample trajectories from the prompted model",
     configs.GenerateConfig, "generate:run_generate"),
    ("train", "train a LoRA on trajectories (KL to the prompted model)",
     configs.TrainConfig, "train:run_train"),
    ("bake", "generate + train in one process: bake a prompt into a LoRA adapter",
     configs.BakeConfig, "bake:bake"),
    ("data", "fetch a public question set (SQuAD, GSM8K) as JSONL",
     configs.DataConfig, "data:fetch_command"),
    ("compare", "per-trajectory NLL: base/baked x with/without prompt",
     configs.CompareConfig, "evaluation.compare:compare"),
    ("eval", "answer and score questions as base, prompted, baked, re-prompted",
     configs.EvalConfig, "evaluation.eval:evaluate_command"),
    ("pursue", "prompt pursuit: bake the prompt again on top of each bake",
     configs.PursueConfig, "pursue:pursue"),
    ("chat", "interactive chat: switch between base, prompted and baked",
     configs.ChatConfig, "chat:chat"),
    ("merge", "merge an adapter into a full model directory",
     configs.MergeConfig, "merge:merge"),
)  # fmt: skip
BY_NAME = {c[0]: c for c in COMMANDS}


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag or choice, a missing argument) as one line,
    like every other refusal, instead of a usage block: raised as a UserError."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def build_parsers(
    prog: str = "promptbake", only: str | None = None
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The full CLI, or (``only``) one subcommand's flags as a standalone script; and
    {command name: the parser of its flags}."""
    if only is not None:
        _, help_, cls, _ = BY_NAME[only]
        p = OneLineParser(prog=prog, description=help_)
        add_arguments(p, cls)
        add_config_flag(p)
        return p, {only: p}
    p = OneLineParser(prog=prog, description="Prompt Baking: turn a prompt into LoRA weights.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, help_, cls, _ in COMMANDS:
        parsers[name] = sub.add_parser(name, help=help_, description=help_)
        add_arguments(parsers[name], cls)
        add_config_flag(parsers[name])
    return p, parsers


def build_parser(prog: str = "promptbake", only: str | None = None) -> argparse.ArgumentParser:
    return build_parsers(prog, only)[0]


def parse_args(argv: list[str] | None, prog: str, only: str | None) -> argparse.Namespace:
    """Flags, over the values of the --config file if one is given."""
    parser, parsers = build_parsers(prog, only)
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    name = only or args.command
    values = config_values(BY_NAME[name][2], read_config_file(args.config), args.config)
    parsers[name].set_defaults(**values)  # the file's values become the defaults...
    return parser.parse_args(argv)  # ...which the flags given override


def run(name: str, args: argparse.Namespace) -> None:
    """Build command `name`'s config from parsed flags and call its function, with no
    network the user did not ask for (models.no_unasked_network)."""
    _, _, cls, target = BY_NAME[name]
    quantized = bool(getattr(args, "load_in_8bit", False) or getattr(args, "load_in_4bit", False))
    with no_unasked_network(names_hub_model(name, args), quantized):
        module, function = target.split(":")
        fn = getattr(importlib.import_module(f".{module}", __package__), function)
        fn(from_namespace(cls, args))


def names_hub_model(name: str, args: argparse.Namespace) -> bool:
    """Whether command `name` may need the Hub: `data` fetches from it; a model command
    when its --model_name, or else its --adapter's recorded base model, is a Hub id (the
    default --model_name is one). Otherwise every input is local and the run stays offline."""
    if name == "data":
        return True
    model = getattr(args, "model_name", None)
    if model:
        return is_hub_name(model)
    adapter = getattr(args, "adapter", None)
    if not adapter:
        return False
    try:
        return is_hub_name(base_model_name(adapter))
    except UserError:  # the command itself refuses this adapter, before any model loads
        return False


def interrupted_message(command: str | None) -> str:
    """Ctrl-C outside a stage that says more (training.loop says more for training)."""
    if command in ("generate", "bake", "pursue"):  # generation keeps its .partial file
        return "interrupted: partial output is kept and the same command resumes it"
    return "interrupted: nothing half-written was kept; the same command starts it again"


def main(argv: list[str] | None = None, prog: str = "promptbake", only: str | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 interrupted by Ctrl-C,
    143 by SIGTERM: both keep the same and print the same line)."""
    args = None
    with sigterm_as_interrupt() as signalled:
        try:
            args = parse_args(argv, prog, only)
            run(only or args.command, args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Interrupted as e:  # a stage said what it kept (training: add --resume true)
            print(f"{e}", file=sys.stderr)
            return 128 + signalled[0] if signalled else 130
        except KeyboardInterrupt:
            print(interrupted_message(only or getattr(args, "command", None)), file=sys.stderr)
            return 128 + signalled[0] if signalled else 130
        return 128 + signalled[0] if signalled else 0


if __name__ == "__main__":
    sys.exit(main())
