"""The teacher's log-probs handed from generation to training through a file.

    python generate_data.py ... --traj_out_file T      # also writes T.teacher.safetensors
    python train_loop.py --data_path T ...             # trains on it: no teacher pass

While sampling, generation computes the prompted model's full next-token distribution
at every generated token: exactly the teacher that training distils (training/teacher.py,
cache_from_generation). ``promptbake bake`` keeps it in memory; the two-script path
(generate_data.py, then train_loop.py) hands it over in a sidecar next to the
trajectories, ``<traj file>.teacher.safetensors``: the float32 table [tokens x vocab]
of every row in file order (``logp``) and each row's offsets (``offsets`` [R + 1]).

The table is only valid for exactly those trajectories and that model, so its header
records a fingerprint of the rows' token ids and which positions were generated
(:func:`rows_fingerprint`), the model name, its dtype and quantization. Training
compares them with what it read and loaded; on any difference (an edited or
regenerated trajectory file, another model or dtype) it warns once and runs its own
teacher pass, as without a sidecar. The header also records the sha256 of the table
(:func:`table_sha256`); a table damaged on disk after it was written (a changed byte
still loads) is ignored the same way, with a warning naming the file: the table is a
cache of what training can compute itself from the intact trajectories, so the run
stays correct, only slower, and the user learns of the damage. Generation writes the
file only when the table fits ``--save_teacher_cache_max_gb`` (``--save_teacher_cache
auto``, the default) or ``always``; a Qwen3-sized vocabulary makes it hundreds of GB
for the seed's full job, so it is then simply not written.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

import torch

from ..errors import warn
from ..files import atomic_path
from ..schema import sidecar_path
from .teacher import TeacherCache, kl_rows

FORMAT = "promptbake-teacher-cache/1"


def rows_fingerprint(rows: list[dict]) -> str:
    """A hash of what the teacher's log-probs depend on: every row's prompted token ids
    and which of them were generated, in file order."""
    h = hashlib.sha256()
    for r in rows:
        ids, mask = r["input_ids"], r["generated_text_mask"]
        h.update(len(ids).to_bytes(8, "little"))
        h.update(array("q", ids).tobytes())
        h.update(array("b", mask).tobytes())
    return h.hexdigest()


def model_key(model_name: str) -> str:
    """The model's name as recorded: a local path made absolute (./m and /abs/m match)."""
    p = Path(model_name).expanduser()
    return str(p.resolve()) if p.exists() else model_name


def model_identity(model_name: str, model, quantized: str) -> dict[str, str]:
    """What else the log-probs depend on: the model, its weights' dtype, quantization."""
    return {
        "model": model_key(model_name),
        "dtype": str(next(model.parameters()).dtype),
        "quantization": quantized,
    }


def quantization(cfg) -> str:
    """The quantization flags of a generate or train config, as one string."""
    return "8bit" if cfg.load_in_8bit else "4bit" if cfg.load_in_4bit else "none"


def table_sha256(logp: torch.Tensor, offsets: torch.Tensor) -> str:
    """The sha256 of a table's tensors: dtypes, shapes and bytes (no copy of the table)."""
    h = hashlib.sha256()
    for t in (logp, offsets):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)};".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_sidecar(traj_path: str | Path, cache: TeacherCache, rows: list[dict], ident: dict) -> Path:
    """Write `cache` (exact, every generated token of `rows`) next to `traj_path`:
    to a temp file, renamed into place when complete."""
    from safetensors.torch import save_file

    path = sidecar_path(traj_path)
    meta = {
        "format": FORMAT,
        "rows": rows_fingerprint(rows),
        "sha256": table_sha256(cache.logp, cache.offsets),
        **ident,
    }
    need = cache.logp.nbytes + cache.offsets.nbytes
    with atomic_path(path, "the teacher sidecar", need) as tmp:
        # save_file streams the tensors to disk (no second in-memory copy of the table)
        save_file({"logp": cache.logp.contiguous(), "offsets": cache.offsets}, str(tmp), meta)
    return path


def _mismatch(meta: dict, rows: list[dict], ident: dict) -> str | None:
    """Why the sidecar's header does not fit these rows and this model (None: it fits)."""
    if meta.get("format") != FORMAT:
        return f"unknown format {meta.get('format')!r}"
    for key, value in ident.items():
        if meta.get(key) != value:
            return f"it was made with {key} {meta.get(key)!r}, this run has {value!r}"
    if meta.get("rows") != rows_fingerprint(rows):
        return "the trajectory file was changed or regenerated after it was written"
    if not meta.get("sha256"):
        return "it records no checksum of its table (an older promptbake wrote it)"
    return None


def cut(cache: TeacherCache, rows: list[dict], max_gen: int | None) -> TeacherCache:
    """The cache of `rows` cut to --max_traj_len generated tokens per row, as training
    cuts them (teacher.kl_rows); unchanged without a cut."""
    if max_gen is None:
        return cache
    keep = [
        torch.arange(int(cache.offsets[i]), int(cache.offsets[i]) + kl_rows(r, max_gen))
        for i, r in enumerate(rows)
    ]
    counts = torch.tensor([len(k) for k in keep], dtype=torch.long)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    sel = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    return TeacherCache("exact", offsets, cache.logp.index_select(0, sel))


def probe_sidecar(traj_path: str | Path, rows: list[dict], ident: dict) -> str:
    """Whether the sidecar of `traj_path` holds the exact table of these `rows` and this
    model (training.targets.SIDECARS): "absent", "fits", or "stale" (warned once: it was
    made for other rows or another model, or it cannot be read). Reads the header only."""
    path = sidecar_path(traj_path)
    if not path.is_file():
        return "absent"
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            why = _mismatch(f.metadata() or {}, rows, ident)
            shape = f.get_slice("offsets").get_shape()
            if why is None and shape != [len(rows) + 1]:
                why = "its offsets do not match the trajectory rows"
    except (SafetensorError, OSError, KeyError) as e:
        why = f"it cannot be read ({e})"
    if why is None:
        return "fits"
    warn(f"ignoring {path}: {why}; training computes the teacher itself")
    return "stale"


def read_sidecar(
    traj_path: str | Path, rows: list[dict], max_gen: int | None
) -> TeacherCache | None:
    """The exact teacher cache of `rows` from a sidecar :func:`probe_sidecar` found to
    fit, cut to --max_traj_len as training cuts its rows; None, with one warning, when
    the table is damaged (its sha256 differs from the recorded one): training then
    computes the teacher itself (see the module docstring)."""
    from safetensors import SafetensorError, safe_open

    path = sidecar_path(traj_path)
    why = None
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("sha256")
            logp, offsets = f.get_tensor("logp"), f.get_tensor("offsets")
    except (SafetensorError, OSError, KeyError) as e:
        why = f"it cannot be read ({e})"
    else:
        if table_sha256(logp, offsets) != recorded:
            why = "its table does not match the sha256 recorded when it was written (damaged)"
        elif len(offsets) != len(rows) + 1 or int(offsets[-1]) != len(logp):
            why = "its offsets do not cover its table (damaged)"
    if why is not None:
        warn(f"ignoring {path}: {why}; training computes the teacher itself (delete the file)")
        return None
    return cut(TeacherCache("exact", offsets, logp), rows, max_gen)
