"""Peak memory of the loss step: full-logit KL (the original) vs promptbake's chunked KL.

    python -m bench.run --config memory         # the bench's memory job (run_memory)
    python -m bench.memory                      # both methods, Qwen3's vocabulary, prints JSON
    python -m bench.memory --one naive --batch 10 --prompt 13 --gen 37 --chunk 64

Method: each measurement runs in a fresh Python process. It builds the inputs (final
hidden states of teacher and student for a right-padded batch, a frozen LM head
[V x H], the mask of rows that predict generated tokens), resets the kernel's peak
resident-set mark to the current RSS (``/proc/self/clear_refs``), runs ONE loss step
(forward + backward to the student's hidden states) and reads the peak (``VmHWM``)
again. The difference is the loss step's peak memory on top of its inputs; torch's CPU
allocations are invisible to tracemalloc, and the kernel's peak counts them all.

* naive: head on every position of both sequences -> [B, T, V] logits, the KL
  (``loss.token_kl``) on the rows that predict generated tokens, mean, backward;
* chunked: the rows that predict generated tokens first ([N, H]), then
  ``loss.divergence`` (forward KL; ``chunk`` rows of logits at a time; with the frozen head, the
  fused path that computes the gradient w.r.t. the hidden states in the forward pass).

The [rows x V] float32 tensors dominate both and do not depend on H, so H defaults to
256 (the LM head's weights are an input, not part of the step); memory is linear in
the row counts, so shapes scaled down by a common factor (B*T, N and chunk) give the
same ratio as full-size ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

QWEN3_VOCAB = 151_936


def _status_bytes(key: str) -> int | None:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _start_peak() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: clear_refs 5)
    and return the current RSS. ``ru_maxrss`` would not do: it survives execve, so a
    child of a big process would inherit its parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _status_bytes("VmRSS") or 0
    except OSError:  # not Linux: the process-lifetime peak (run it in a fresh process)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak() -> int:
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(method: str, batch: int, prompt: int, gen: int, chunk: int, vocab: int, hidden: int):
    """Run one loss step in THIS process; return the peak-RSS increase in bytes."""
    import torch

    from promptbake.loss import TeacherTarget, divergence, token_kl

    torch.manual_seed(0)
    T = prompt + gen
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight.requires_grad_(False)
    t_h = torch.randn(batch, T, hidden)
    s_h = torch.randn(batch, T, hidden, requires_grad=True)
    pred = torch.zeros(batch, T, dtype=torch.bool)
    pred[:, prompt - 1 : T - 1] = True  # each row predicts `gen` generated tokens
    # touch a small step first so lazy allocator/library state is not counted
    warm = TeacherTarget(hidden=t_h[:1, :2].reshape(-1, hidden))
    divergence(s_h[:1, :2].reshape(-1, hidden), head, warm, 2)
    before = _start_peak()
    if method == "naive":
        with torch.no_grad():
            t_logits = head(t_h)  # [B, T, V]
        s_logits = head(s_h)  # [B, T, V]
        kl = token_kl(t_logits[pred], s_logits[pred])
    elif method == "chunked":
        kl = divergence(s_h[pred], head, TeacherTarget(hidden=t_h[pred]), chunk)
    else:
        raise ValueError(method)
    kl.mean().backward()
    return _peak() - before


def run_one(method: str, **shape) -> int:
    """`measure` in a fresh subprocess (so earlier peaks do not hide this one)."""
    args = [sys.executable, "-m", "bench.memory", "--one", method]
    for k, v in shape.items():
        args += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(args, capture_output=True, text=True, cwd=root, env=env, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def compare(
    batch: int = 10,
    prompt: int = 13,
    gen: int = 37,
    chunk: int = 128,
    vocab: int = QWEN3_VOCAB,
    hidden: int = 256,
) -> dict:
    """Both methods at one shape; the ratio chunked / naive."""
    shape = dict(batch=batch, prompt=prompt, gen=gen, chunk=chunk, vocab=vocab, hidden=hidden)
    naive = run_one("naive", **shape)
    chunked = run_one("chunked", **shape)
    rows_bytes = vocab * 4  # one float32 row of logits
    return {
        **shape,
        "naive_bytes": naive,
        "chunked_bytes": chunked,
        "ratio": chunked / naive,
        # the same numbers in units of one float32 [rows x V] tensor, to extrapolate
        "naive_logit_copies": naive / (batch * (prompt + gen) * rows_bytes),
        "chunked_logit_copies": chunked / (min(chunk, batch * gen) * rows_bytes),
    }


def run_memory(quick: bool = False) -> dict:
    """The bench's memory job; shapes = the seed's Example 1 scaled down 8x (above)."""
    vocab = 4096 if quick else QWEN3_VOCAB
    # chunk 64 here is the default --kl_chunk_size 512 at full size; 128 is 1024
    out = {"default_chunk": compare(chunk=64, vocab=vocab)}
    if not quick:
        out["double_chunk"] = compare(chunk=128, vocab=vocab)
    out["ratio"] = out["default_chunk"]["ratio"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", choices=["naive", "chunked"], help="measure one method, here")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--prompt", type=int, default=13)
    p.add_argument("--gen", type=int, default=37)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    p.add_argument("--hidden", type=int, default=256)
    a = p.parse_args(argv)
    shape = dict(
        batch=a.batch, prompt=a.prompt, gen=a.gen, chunk=a.chunk, vocab=a.vocab, hidden=a.hidden
    )
    if a.one:
        print(json.dumps({"method": a.one, "peak_bytes": measure(a.one, **shape)}))
    else:
        print(json.dumps(compare(**shape), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
