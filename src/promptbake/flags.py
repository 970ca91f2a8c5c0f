"""Config dataclasses (the configs package) as command-line flags.

    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerateConfig)
    cfg = from_namespace(GenerateConfig, parser.parse_args())

Each field is a flag ``--<field name>`` with the field's type and default; ``bool`` fields
take true/false. cli.py builds every command's parser this way.

``--config FILE`` (every command) reads flag values from a YAML or JSON file whose keys
are the flag names; flags given on the command line override it:

    # bake.yaml                       promptbake bake --config bake.yaml --num_epochs 2
    prompt: Your name is Zorblax.
    num_epochs: 6
    r: 16

A run's args.json (train, bake) and a trajectory file's .meta.json (generate) hold the
same keys, so ``--config <run>/args.json`` repeats the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from .configs import ModelArgs
from .errors import UserError
from .records import check_input_file


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


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` a user sets by name: flags and config-file keys alike."""
    return [
        f
        for f in dataclasses.fields(cls)
        if f.name not in cls.SET_BY_COMMAND and not f.metadata.get("positional")
    ]


def flag_values(cfg: Any) -> dict[str, Any]:
    """{flag name: value} of a config: what a run writes to args.json, a valid --config."""
    return {f.name: getattr(cfg, f.name) for f in flag_fields(type(cfg))}


# ---------------------------------------------------------------- --config FILE
def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of flag values (keys: flag names, e.g. num_epochs); flags on "
        "the command line override it. A run's args.json repeats the run",
    )


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a .json/.yaml/.yml file; a trajectory .meta.json gives its "args"."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise UserError(f"--config {path}: expected a .json, .yaml or .yml file")
    if p.exists():  # a directory, FIFO or device: said what it is, never opened
        check_input_file(p, "--config")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte order mark is no part of it
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json and yaml syntax errors: one line naming where
        msg = " ".join(str(e).split())
        raise UserError(f"--config {path}: not valid {suffix[1:].upper()}: {msg}") from None
    if p.name.endswith(".meta.json") and isinstance(data, dict) and "args" in data:
        data = data["args"]  # a trajectory sidecar: the generation's arguments
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return data


def config_values(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    """`data` checked against the flags of `cls` and converted to their types."""
    fields = {f.name: f for f in flag_fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UserError(
            f"--config {path}: unknown key {unknown[0]!r}; valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    return {k: _convert(v, hints[k], fields[k], path) for k, v in data.items()}


def _convert(value: Any, hint: Any, f: dataclasses.Field, path: str) -> Any:
    tp = _base_type(hint)
    bad = UserError(f"--config {path}: {f.name} expects {_type_name(hint)}, got {value!r}")
    if value is None:
        if tp is hint:  # not Optional
            raise bad
        return None
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and tp is not bool):
        raise bad
    try:
        if tp is bool:
            out = value if isinstance(value, bool) else parse_bool(value)
        elif tp is int and isinstance(value, float):
            raise ValueError
        elif tp is float and not isinstance(value, str):
            out = float(value)
        else:
            out = tp(value)  # int("3"), float("1e-3"), str(1) for a str flag
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise bad from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise UserError(
            f"--config {path}: {f.name} must be one of {', '.join(map(str, choices))}, "
            f"got {value!r}"
        )
    return out


def _type_name(hint: Any) -> str:
    tp = _base_type(hint)
    name = {bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))
    return name if tp is hint else f"{name} or null"
