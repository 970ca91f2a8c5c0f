"""The sampling seam: given prompts and sampling settings, return each row's new ids.

    from promptbake.sampling import Sampling, sample
    out = sample(model, prompt_ids, Sampling(max_new_tokens=64, temperature=1.0),
                 pad_id=tok.pad_token_id, eot_ids=end_of_turn_ids(tok, model))
    out.new_ids      # list of lists: each row's new tokens, cut after the first end-of-turn
    out.logprobs     # with return_logprobs=True: each row's [n_i, V] float32 CPU log-probs

Every caller that samples (generation, held-out answers, eval, chat, pursuit, on-policy
training) goes through :func:`sample`; an engine is one module with a function of the
:class:`Engine` type, named in :data:`ENGINES`. ``--engine`` picks one; ``auto`` takes
the fastest engine for the device.

Contract of an engine, whatever it does inside:
* rows are independent: row i's ids depend only on prompt i, the settings and the RNG;
* the new ids stop after the first end-of-turn id (kept), never hold padding, and
  have at least ``min_new_tokens`` tokens unless ``max_new_tokens`` is smaller;
* randomness comes from torch's global RNG of the model's device, so the caller's
  ``torch.manual_seed`` makes a call reproducible;
* ``logprobs`` are the model's own raw (temperature 1, unfiltered) next-token
  log-probabilities at each kept position: exactly the teacher's targets there.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..configs.choices import ENGINE_NAMES
from ..errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How to sample. ``temperature`` None or 0 means greedy decoding."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float | None = 1.0
    top_p: float | None = None
    top_k: int | None = None
    # options of the hf engine: transformers' static cache (compiled on CUDA)
    cache_implementation: str = "dynamic"
    compile: bool = True
    # option of the vllm engine: the share of GPU memory (on a CPU: of RAM) it may hold
    vllm_memory: float | None = None


@dataclass
class Samples:
    """One batch's rows. With ``return_logprobs``, an engine whose ``RETURNS`` is "full"
    fills ``logprobs`` (each row's [n_i, V] float32 CPU log-probs), one whose ``RETURNS``
    is "topk" fills ``topk`` (each row's (ids [n_i, k] int64, log-probs [n_i, k] float32),
    the k most likely tokens by rank)."""

    new_ids: list[list[int]]
    logprobs: list[torch.Tensor] | None = None
    topk: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def kept(self) -> list | None:
        """What the engine handed back per row, whichever form it has."""
        return self.logprobs if self.logprobs is not None else self.topk


class Engine(Protocol):
    def __call__(
        self,
        model,
        prompts: list[list[int]],
        settings: Sampling,
        *,
        pad_id: int,
        eot_ids: list[int],
        return_logprobs: bool = False,
    ) -> Samples: ...


# name -> "module:function"; imported on first use, so an engine's heavy imports
# (compilers, kernels) cost nothing to the others
ENGINES: dict[str, str] = {
    "hf": "promptbake.sampling.hf:sample",
    "static": "promptbake.sampling.static:sample",
    "vllm": "promptbake.sampling.vllm:sample",
}
assert ("auto", *ENGINES) == ENGINE_NAMES, "configs.choices.ENGINE_NAMES lists the engines"


def engine_names() -> list[str]:
    """The --engine choices."""
    return list(ENGINE_NAMES)


_LOGGED: set = set()  # auto choices already logged in this process


def resolve_engine(name: str, device: torch.device | str) -> str:
    """``auto``: vllm on CUDA when it is installed, else static (a compiled static-cache
    decode step) on CUDA, hf elsewhere; the choice is logged once per process."""
    if name != "auto":
        if name not in ENGINES:
            raise ValueError(f"unknown sampling engine {name!r}; choose from {engine_names()}")
        return name
    cuda = torch.device(device).type == "cuda"
    if not cuda:
        choice, why = "hf", "not on CUDA"
    elif importlib.util.find_spec("vllm") is not None:
        choice, why = "vllm", "CUDA, and vllm is installed"
    else:
        choice, why = "static", "CUDA, vllm not installed"
    if cuda and choice not in _LOGGED:  # off CUDA auto is always hf: nothing to say
        _LOGGED.add(choice)
        print(f"sampling engine: {choice} (--engine auto: {why})", file=sys.stderr, flush=True)
    return choice


def context_limit(model) -> int | None:
    """The model's context in positions (``config.max_position_embeddings``), or None."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


def check_context(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """UserError, before any work, when a prompt plus its new tokens exceeds the model's
    context (``config.max_position_embeddings``; no check when the config has none)."""
    limit = context_limit(model)
    longest = max((len(p) for p in prompts), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        raise UserError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the "
            f"model's context of {limit} positions: lower --max_sequence_length or "
            "shorten the system prompt / questions"
        )


def get_engine(name: str) -> Callable[..., Samples]:
    module, fn = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def returns(name: str, device: torch.device | str) -> str:
    """What engine `name` hands back with ``return_logprobs`` (its module's ``RETURNS``):
    "full" (every row's [n_i, V] log-probs), "topk" (top-k ids and log-probs), "none"."""
    module = ENGINES[resolve_engine(name, device)].split(":")[0]
    return getattr(importlib.import_module(module), "RETURNS", "none")


def with_model_defaults(settings: Sampling, model) -> Sampling:
    """`settings` with the top-k / top-p the model's generation config gives where they
    are None (what --top_k / --top_p's "default: the model's generation config" means),
    so that every engine samples the same distribution. 0 asks for no filter."""
    if not settings.temperature:
        return settings
    config = getattr(model, "generation_config", None)
    top_k = settings.top_k if settings.top_k is not None else getattr(config, "top_k", None)
    top_p = settings.top_p if settings.top_p is not None else getattr(config, "top_p", None)
    return dataclasses.replace(settings, top_k=top_k, top_p=top_p)


def sample(
    model,
    prompts: list[list[int]],
    settings: Sampling,
    *,
    pad_id: int,
    eot_ids: list[int],
    return_logprobs: bool = False,
    engine: str = "auto",
) -> Samples:
    """Sample one batch of rows with `engine` (see the module docstring)."""
    check_context(model, prompts, settings.max_new_tokens)
    name = resolve_engine(engine, model.device)
    settings = with_model_defaults(settings, model)
    return get_engine(name)(
        model, prompts, settings, pad_id=pad_id, eot_ids=eot_ids, return_logprobs=return_logprobs
    )


def release(model) -> None:
    """Free what the engines keep on `model` between batches (the static engine's KV
    cache: gigabytes on a GPU at --batch_size 256), e.g. before training starts. An
    engine that keeps something defines ``release(model)`` next to its sampler."""
    for target in ENGINES.values():
        module = importlib.import_module(target.split(":")[0])
        if hasattr(module, "release"):
            module.release(model)
