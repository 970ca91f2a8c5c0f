"""What every bench job shares: the log line, clocks and rates, the machine's name, the
model load, and the held-out KL that scores an adapter.

    from bench.common import Lap, add_rates, heldout, load, log
    lap = Lap(); ...; times = add_rates(lap.done(), tokens)   # seconds, CPU seconds, rates
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (recorded around each job)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_name() -> str:
    """bench/results/<this>.json: BENCH_MACHINE, else the device kind and core count."""
    if os.environ.get("BENCH_MACHINE"):
        return os.environ["BENCH_MACHINE"]
    if torch.cuda.is_available():
        name = "gpu-" + torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or "cpu"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1]
                    break
        name = f"cpu-{os.cpu_count()}c-{cpu}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


class Lap:
    """Wall-clock and process CPU time since creation. CPU time counts only this
    process's work, so with one torch thread it is what the phase would take on an idle
    core: the steadier measure on a shared machine."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self) -> dict:
        return {
            "seconds": time.perf_counter() - self.wall,
            "cpu_seconds": time.process_time() - self.cpu,
        }


def add_rates(d: dict, tokens: int) -> dict:
    """A Lap's times plus tokens per wall-clock second and per CPU second."""
    d["tokens_per_s"] = tokens / max(d["seconds"], 1e-9)
    d["tokens_per_cpu_s"] = tokens / max(d["cpu_seconds"], 1e-9)
    return d


def load(job) -> tuple:
    """(model, tokenizer, lap) for promptbake's loader (cached float weights); `job.model`
    "tiny" is the random model of tests/tiny.py (--quick)."""
    lap = Lap()
    if job.model == "tiny":
        from tests import tiny

        tok = tiny.chatml_tokenizer("tiny")
        tok.padding_side = "left"
        model = tiny.tiny_qwen3(tok, initializer_range=0.2)
        model.name_or_path = "tiny"
    else:
        from promptbake.models import load_model

        model, tok = load_model(job.model, device="cpu", dtype="float32")
    return model, tok, lap.done()


def heldout(model, tok, val_rows: list[dict], chunk: int, adapter: bool = True) -> float:
    """KL(prompted || model) per token on the held-out trajectories `val_rows`."""
    from promptbake.models import pad_id
    from promptbake.training.batches import make_batches
    from promptbake.training.objective import evaluate_kl

    pad = pad_id(tok)
    return evaluate_kl(model, make_batches(val_rows, 8, pad, None), chunk, adapter)["kl"]
