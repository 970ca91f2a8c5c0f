"""Baked adapters after training: load one onto its base model, scale it, merge it.

    from promptbake.adapters import load_adapter, set_adapter_scale
    model, tok, base_name = load_adapter("runs/zorblax")       # base name from the run
    set_adapter_scale(model, 0.5)                                # "half-baked"

    promptbake merge --adapter runs/zorblax --out merged/zorblax

The base model is found from the adapter itself: ``base_model_name_or_path`` in its
adapter_config.json (what peft records), else ``model_name`` in the run's args.json
(the adapter directory or, for ``epoch_N/`` checkpoints, its parent); ``--model_name``
overrides both.

Adapter scale: peft computes each LoRA layer as ``W x + scaling * B A x`` with
``scaling = alpha / r``. ``set_adapter_scale(model, s)`` sets ``scaling = s * alpha / r``
on every LoRA layer, so s = 0 adds exactly zero (the base model's logits, bit for bit),
s = 1 is the baked model and s > 1 amplifies the update. Merging honours the scale.

Prompt-pursuit rounds (pursue.py) train adapter k on top of the merged adapters
1..k-1; such a directory holds ``promptbake_chain.json`` naming those earlier adapters,
and ``load_adapter``/``attach_adapter`` merge them first, so ``--adapter out/round_2``
works like any other adapter.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from .configs import MergeConfig
from .data import check_out_dir
from .errors import UserError
from .models import load_model

CHAIN_FILE = "promptbake_chain.json"


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
    return p


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


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
    chain = p / CHAIN_FILE
    if chain.is_file() and _read_json(chain).get("base_model"):
        return _read_json(chain)["base_model"]
    name = _read_json(p / "adapter_config.json").get("base_model_name_or_path")
    if name:
        return name
    args = run_file(p, "args.json")
    if args is not None and _read_json(args).get("model_name"):
        return _read_json(args)["model_name"]
    raise UserError(
        f"--adapter {adapter}: cannot tell which base model it belongs to (no "
        "base_model_name_or_path in adapter_config.json, no args.json); pass --model_name"
    )


def run_prompt(adapter: str | Path) -> str | None:
    """The prompt a run baked, from its summary.json or trajectory metadata, if recorded."""
    summary = run_file(adapter, "summary.json")
    if summary is not None and _read_json(summary).get("prompt"):
        return _read_json(summary)["prompt"]
    for name in ("trajectories_train.jsonl.meta.json", "trajectories_val.jsonl.meta.json"):
        meta = run_file(adapter, name)
        if meta is not None and _read_json(meta).get("x0"):
            return _read_json(meta)["x0"]
    args = run_file(adapter, "args.json")
    data = _read_json(args).get("data_path") if args is not None else None
    if data and Path(data + ".meta.json").is_file():
        return _read_json(Path(data + ".meta.json")).get("x0")
    return None


def resolve_prompt(
    x0_file: str | None, prompt: str | None, adapter: str | None
) -> str | list[dict] | None:
    """--prompt text, else --x0_file (text, or a .json list of chat messages), else the
    prompt recorded by the adapter's run."""
    from .data import prompt_text, read_prompt

    if prompt is not None:
        return prompt_text(prompt)
    if x0_file:
        return read_prompt(x0_file)
    return run_prompt(adapter) if adapter else None


# ---------------------------------------------------------------- loading
def attach_adapter(model, adapter: str | Path):
    """Wrap a loaded base model in the adapter (merging a pursuit chain's earlier rounds)."""
    from peft import PeftModel

    p = adapter_dir(adapter)
    chain = p / CHAIN_FILE
    if chain.is_file():
        for earlier in _read_json(chain).get("merge_first", []):
            d = adapter_dir(p / earlier, f"{chain} entry")
            model = PeftModel.from_pretrained(model, d).merge_and_unload()
    return PeftModel.from_pretrained(model, p)


def load_adapter(
    adapter: str | Path,
    model_name: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
):
    """(peft model in eval mode, tokenizer, base model name) for an adapter directory."""
    name = base_model_name(adapter, model_name)
    model, tok = load_model(name, device, dtype, trust_remote_code)
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
    `model` itself is left untouched."""
    return copy.deepcopy(model).merge_and_unload()


# ---------------------------------------------------------------- promptbake merge
def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not (or was not) a merged model."""
    check_out_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(f"--out {out} exists and is not a model directory; choose another path")


def merge(cfg: MergeConfig) -> Path:
    """Write adapter-merged weights + tokenizer to cfg.out; the directory appears at once."""
    cfg.validate()
    out = Path(cfg.out).expanduser()
    _check_out(out)
    model, tok, name = load_adapter(
        cfg.adapter, cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code
    )
    set_adapter_scale(model, cfg.adapter_scale)
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():  # swap: move the old model aside, rename the new one in
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "model")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    print(f"Merged {cfg.adapter} (scale {cfg.adapter_scale:g}) into {name}: wrote {out}")
    return out


def load_model_and_adapter(adapter: Path | None, cfg) -> tuple:
    """(model, tokenizer) for the eval-style commands: the adapter on its base model when
    one is given, else the plain model; `cfg` carries the ModelArgs flags."""
    if adapter is None:
        return load_model(cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code)
    model, tokenizer, _ = load_adapter(
        adapter, cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code
    )
    return model, tokenizer
