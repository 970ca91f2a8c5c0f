"""`promptbake merge`: write a full model with the adapter merged in, for serving engines.

    promptbake merge --adapter runs/zorblax --out merged/zorblax [--adapter_scale 0.5]

The adapter is loaded on its recorded base model (adapters.load_adapter), scaled, and
merged; weights and tokenizer are written to a temporary directory that is renamed
into place (files.atomic_dir), so --out appears complete or not at all. ``--out DIR``
replaces DIR only when this tool wrote it (it holds ``.promptbake-merged``); any other
non-empty directory is refused, left untouched.
"""

from __future__ import annotations

from pathlib import Path

from .adapters import adapter_dir, base_model_name, load_adapter, set_adapter_scale
from .configs import MergeConfig
from .errors import UserError
from .files import atomic_dir, write_text
from .guards import check_not_inputs, check_out_dir
from .models import model_options

MERGED_MARKER = ".promptbake-merged"


# ---------------------------------------------------------------- promptbake merge
def _check_out(out: Path) -> None:
    """Refuse to replace a directory unless `merge` wrote it (it holds MERGED_MARKER)."""
    check_out_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / MERGED_MARKER).is_file():
        raise UserError(
            f"--out {out} exists and is not a model directory written by promptbake merge "
            f"(no {MERGED_MARKER}); it is left untouched: choose another path"
        )


def merge(cfg: MergeConfig) -> Path:
    """Write adapter-merged weights + tokenizer to cfg.out; the directory appears at once."""
    cfg.validate()
    out = Path(cfg.out).expanduser()
    _check_out(out)
    # --out is replaced whole: neither it nor anything in it may be an input (the adapter,
    # its base model: --model_name or the one it records)
    adapter_dir(cfg.adapter)  # a damaged adapter folder is refused before any model loads
    base = base_model_name(cfg.adapter, cfg.model_name)
    check_not_inputs([("--out", out, ("*",))], [("--adapter", cfg.adapter), ("--model_name", base)])
    model, tok, name = load_adapter(
        cfg.adapter,
        cfg.model_name,
        cfg.device,
        cfg.dtype,
        cfg.trust_remote_code,
        **model_options(cfg),
    )
    set_adapter_scale(model, cfg.adapter_scale)
    merged = model.merge_and_unload()
    weights = {t.data_ptr(): t.numel() * t.element_size() for t in merged.state_dict().values()}
    need = sum(weights.values())  # tied weights are written once
    # the old model stays until the new one is complete
    with atomic_dir(out, what="the merged model", need=need) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_text(tmp / MERGED_MARKER, f"written by promptbake merge from {cfg.adapter}\n")
    print(f"Merged {cfg.adapter} (scale {cfg.adapter_scale:g}) into {name}: wrote {out}")
    return out
