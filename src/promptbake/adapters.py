"""Baked adapters after training: load one onto its base model, scale it, merge it.

    from promptbake.adapters import load_adapter, set_adapter_scale
    model, tok, base_name = load_adapter("runs/zorblax")       # base name from the run
    set_adapter_scale(model, 0.5)                                # "half-baked"

    promptbake merge --adapter runs/zorblax --out merged/zorblax

The base model is found from the adapter itself: the name the user gave, kept in
``promptbake_adapter.json`` by :func:`save_peft`, else ``base_model_name_or_path`` in its
adapter_config.json (what peft records), else ``model_name`` in the run's args.json
(the adapter directory or, for ``epoch_N/`` checkpoints, its parent); ``--model_name``
overrides them all. Saving never asks the Hub anything: for a bundled alias or a .gguf
file, adapter_config.json names the local directory the weights came from.

Only ``adapter_model.safetensors`` is loaded; a pickled ``adapter_model.bin`` is
refused (unpickling runs code), and so is a truncated file, before any model loads.

Adapter scale: peft computes each LoRA layer as ``W x + scaling * B A x`` with
``scaling = alpha / r``. ``set_adapter_scale(model, s)`` sets ``scaling = s * alpha / r``
on every LoRA layer, so s = 0 adds exactly zero (the base model's logits, bit for bit),
s = 1 is the baked model and s > 1 amplifies the update. Merging honours the scale.

Prompt-pursuit rounds (pursue.py) train adapter k on top of the merged adapters
1..k-1; such a directory holds ``promptbake_chain.json`` naming those earlier adapters,
and ``load_adapter``/``attach_adapter`` merge them first (naming each one), so
``--adapter out/round_2`` works like any other adapter. Only relative paths inside the
pursuit's own output directory are followed.

``promptbake merge --out DIR`` replaces DIR only when this tool wrote it (it holds
``.promptbake-merged``); any other non-empty directory is refused, left untouched.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import apply_umask, write_json
from .models import load_model, model_options, resolve_model_path
from .records import read_json

CHAIN_FILE = "promptbake_chain.json"
ADAPTER_FILE = "promptbake_adapter.json"  # our record: {"base_model": the name the user gave}
WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------- finding things
def adapter_dir(path: str | Path, what: str = "--adapter") -> Path:
    """The adapter directory, checked: it must hold a peft adapter_config.json."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{what} {path}: no such directory (give a bake/train --out_dir)")
    if not (p / "adapter_config.json").is_file():
        hint = ""
        if sorted(p.glob("epoch_*/adapter_config.json")):
            hint = " (it has epoch_N/ checkpoints: pass one of those)"
        raise UserError(f"{what} {path}: no adapter_config.json, not a LoRA adapter{hint}")
    config = read_record(p / "adapter_config.json")  # peft would fail on it in a traceback
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{what} {path}: adapter_config.json has peft_type {config.get('peft_type')!r}, "
            "not 'LORA': not a LoRA adapter promptbake wrote"
        )
    check_weights(p, what)
    return p


def check_weights(p: Path, what: str = "--adapter") -> None:
    """The adapter's weights must be a complete safetensors file (cheap: reads the header)."""
    from safetensors import safe_open

    weights = p / WEIGHTS
    if not weights.is_file():
        if (p / "adapter_model.bin").is_file():
            raise UserError(
                f"{what} {p}: holds only adapter_model.bin, a pickle, which promptbake does not "
                "load (unpickling can run code); re-save the adapter as safetensors with peft "
                "(save_pretrained(dir, safe_serialization=True)) from a source you trust"
            )
        raise UserError(f"{what} {p}: no {WEIGHTS} (an incomplete adapter directory)")
    try:
        with safe_open(weights, "pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError: truncated or not a safetensors file
        raise UserError(
            f"{what} {weights} is damaged ({e}); copy it again or train it again"
        ) from None


# the fields of a run's records that are read back, and their JSON types
RECORD_FIELDS: dict[str, Any] = {
    "base_model": str,  # promptbake_adapter.json, promptbake_chain.json
    "merge_first": list,  # promptbake_chain.json
    "base_model_name_or_path": (str, type(None)),  # adapter_config.json
    "peft_type": str,
    "model_name": str,  # args.json
    "data_path": (str, type(None)),
    "val_path": (str, type(None)),
    "prompt": (str, list),  # summary.json
    "x0": (str, list),  # .meta.json
}


def read_record(path: Path) -> dict:
    """A run's JSON record (read_json: one line when it is damaged or of the wrong shape)."""
    return read_json(
        path, hint="the run folder is damaged: restore the file, or train it again",
        fields=RECORD_FIELDS,
    )  # fmt: skip


def run_dirs(adapter: Path) -> list[Path]:
    """Where a run's files may be: the adapter directory, then (epoch_N/) its parent."""
    return [adapter, adapter.parent] if adapter.name.startswith("epoch_") else [adapter]


def run_file(adapter: str | Path, name: str) -> Path | None:
    """The first `name` found among the run directories of an adapter, or None."""
    for d in run_dirs(Path(adapter)):
        if (d / name).is_file():
            return d / name
    return None


def base_model_name(adapter: str | Path, override: str | None = None) -> str:
    """The base model an adapter was trained on (see the module docstring for the order)."""
    if override:
        return override
    p = adapter_dir(adapter)
    for record in (p / CHAIN_FILE, p / ADAPTER_FILE):
        if record.is_file() and read_record(record).get("base_model"):
            return read_record(record)["base_model"]
    name = read_record(p / "adapter_config.json").get("base_model_name_or_path")
    if name:
        return name
    args = run_file(p, "args.json")
    if args is not None and read_record(args).get("model_name"):
        return read_record(args)["model_name"]
    raise UserError(
        f"--adapter {adapter}: cannot tell which base model it belongs to (no "
        "base_model_name_or_path in adapter_config.json, no args.json); pass --model_name"
    )


def run_prompt(adapter: str | Path) -> str | None:
    """The prompt a run baked, from its summary.json or trajectory metadata, if recorded."""
    summary = run_file(adapter, "summary.json")
    if summary is not None and read_record(summary).get("prompt"):
        return read_record(summary)["prompt"]
    for name in ("trajectories_train.jsonl.meta.json", "trajectories_val.jsonl.meta.json"):
        meta = run_file(adapter, name)
        if meta is not None and read_record(meta).get("x0"):
            return read_record(meta)["x0"]
    args = run_file(adapter, "args.json")
    data = read_record(args).get("data_path") if args is not None else None
    if data and Path(data + ".meta.json").is_file():
        return read_record(Path(data + ".meta.json")).get("x0")
    return None


def resolve_prompt(
    x0_file: str | None, prompt: str | None, adapter: str | None
) -> str | list[dict] | None:
    """--prompt text, else --x0_file (text, or a .json list of chat messages), else the
    prompt recorded by the adapter's run."""
    from .records import prompt_text, read_prompt

    if prompt is not None:
        return prompt_text(prompt)
    if x0_file:
        return read_prompt(x0_file)
    return run_prompt(adapter) if adapter else None


# ---------------------------------------------------------------- saving
def save_peft(model, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """``model.save_pretrained(out_dir)`` with no Hub request and the user's file modes.

    peft asks the Hub whether a repository named like the base model exists (to decide
    whether to save embedding layers; we never train them, so we say no). A bundled
    alias or .gguf name is no Hub id: adapter_config.json gets the local directory the
    weights were loaded from, and ADAPTER_FILE keeps the name the user gave.
    """
    out_dir = Path(out_dir)
    configs = getattr(model, "peft_config", None)
    if not configs:  # a plain model (never a LoRA run in practice)
        model.save_pretrained(out_dir, state_dict=state_dict)
        apply_umask(out_dir)
        return
    base = model.get_base_model()
    given = {k: c.base_model_name_or_path for k, c in configs.items()}
    name = next(iter(given.values())) or getattr(base, "name_or_path", None) or None
    try:
        for c in configs.values():
            c.base_model_name_or_path = _local_name(name)
        model.save_pretrained(out_dir, state_dict=state_dict, save_embedding_layers=False)
    finally:
        for k, c in configs.items():
            c.base_model_name_or_path = given[k]
    if name:
        write_json(out_dir / ADAPTER_FILE, {"base_model": name})
    apply_umask(out_dir)


def _local_name(name: str | None) -> str | None:
    """Where `name`'s weights are on this machine (absolute), or `name` for a Hub id."""
    if not name:
        return name
    try:
        path, kind = resolve_model_path(name)
    except UserError:  # not loadable by name here (a test model's label): keep it as is
        return name
    return name if kind == "hub" else str(Path(path).resolve())


# ---------------------------------------------------------------- loading
def chain_entries(p: Path) -> list[Path]:
    """The adapters a pursuit round merges first: relative paths inside its own output
    directory (the round directory's parent), checked, in order."""
    chain = p / CHAIN_FILE
    if not chain.is_file():
        return []
    root = p.resolve().parent
    dirs = []
    for entry in read_record(chain).get("merge_first", []):
        d = (p / str(entry)).resolve()
        if Path(str(entry)).is_absolute() or not d.is_relative_to(root) or d == p.resolve():
            raise UserError(
                f"{chain}: merge_first entry {entry!r} is outside this pursuit run ({root}); "
                "only relative paths to its other rounds are followed; fix or delete the file"
            )
        dirs.append(adapter_dir(d, f"{chain} entry"))
    return dirs


def attach_adapter(model, adapter: str | Path):
    """Wrap a loaded base model in the adapter (merging a pursuit chain's earlier rounds)."""
    from peft import PeftModel

    p = adapter_dir(adapter)
    for d in chain_entries(p):
        print(f"merging earlier pursuit round {d} first ({p / CHAIN_FILE})", file=sys.stderr)
        model = _from_pretrained(PeftModel, model, d).merge_and_unload()
    return _from_pretrained(PeftModel, model, p)


def _from_pretrained(peft_cls, model, p: Path):
    """PeftModel.from_pretrained, with a foreign adapter as one line naming both models."""
    try:
        return peft_cls.from_pretrained(model, p)
    except (RuntimeError, ValueError) as e:
        text = str(e)
        if "size mismatch" not in text and "not found in the base model" not in text:
            raise
        try:
            recorded = base_model_name(p)
        except UserError:
            recorded = "another model"
        loaded = getattr(model, "name_or_path", None) or "this model"
        raise UserError(
            f"--adapter {p} was trained on {recorded}, not on {loaded}: its LoRA weights do not "
            "fit this model's layers; pass the adapter's own base with --model_name (or drop it)"
        ) from None


def load_adapter(
    adapter: str | Path,
    model_name: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    **options,
):
    """(peft model in eval mode, tokenizer, base model name) for an adapter directory.

    `options`: load_model's attn_implementation / load_in_8bit / load_in_4bit."""
    name = base_model_name(adapter, model_name)
    model, tok = load_model(name, device, dtype, trust_remote_code, **options)
    return attach_adapter(model, adapter).eval(), tok, name


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_adapter_scale(model, scale: float) -> None:
    """Scale every LoRA update to `scale` x its trained size (0: base exactly, 1: baked)."""
    layers = lora_layers(model)
    if not layers:
        if scale != 1:
            raise UserError("--adapter_scale needs an adapter, but the model has none")
        return
    for layer in layers:
        for name in list(layer.scaling):
            # peft's set_scale recomputes from alpha / r (or sqrt(r) with rsLoRA): no drift
            # when called repeatedly, unlike multiplying the current value
            layer.set_scale(name, scale)


def merged_copy(model):
    """A plain transformers model with the adapter (at its current scale) merged in;
    `model` itself is left untouched. Its weights exist only in memory (engines that load
    from a folder, vLLM, sample it with the hf engine instead)."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged._promptbake_in_memory = True
    return merged


def load_model_and_adapter(adapter: Path | None, cfg) -> tuple:
    """(model, tokenizer) for the eval-style commands: the adapter on its base model when
    one is given, else the plain model; `cfg` carries the ModelArgs flags."""
    options = model_options(cfg)
    if adapter is None:
        return load_model(cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code, **options)
    model, tokenizer, _ = load_adapter(
        adapter, cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code, **options
    )
    return model, tokenizer
