"""Config dataclasses (configs.py) as command-line flags.

    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerateConfig)
    cfg = from_namespace(GenerateConfig, parser.parse_args())

Each field is a flag ``--<field name>`` with the field's type and default; ``bool`` fields
take true/false. cli.py builds every command's parser this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from .configs import ModelArgs


def parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base_type(tp: Any) -> Any:
    """int | None -> int, etc."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass `cls` (its name, the field's type, default,
    help and choices), but none for the fields the command sets itself (SET_BY_COMMAND)."""
    hints = typing.get_type_hints(cls)
    shared = {f.name for f in dataclasses.fields(ModelArgs)}
    # the stage's own flags first, the shared model flags last: what --help shows first
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):
        if f.name in cls.SET_BY_COMMAND:
            continue
        tp = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"default": f.default, "dest": f.name}
        help_ = f.metadata.get("help", "")
        if tp is bool:
            kwargs.update(type=parse_bool, metavar="{true,false}")
        else:
            kwargs["type"] = tp
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.default is not None and f.default != "":
            help_ += f" (default: {f.default})"
        if f.metadata.get("positional"):
            del kwargs["dest"], kwargs["default"]
            parser.add_argument(f.name, help=help_, **kwargs)
            continue
        flags = [f"--{f.name}", *f.metadata.get("aliases", ())]
        parser.add_argument(*flags, help=help_, **kwargs)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """The config `cls` from parsed flags (other namespace entries are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})
