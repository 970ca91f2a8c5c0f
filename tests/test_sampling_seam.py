"""The sampling seam (promptbake.sampling.seam): picking an engine, the context check every
engine gets, and releasing what an engine holds between calls.

    python -m pytest tests/test_sampling_seam.py -q
"""

import pytest
import torch
from tiny import sample_with, sampling_prompts

from promptbake.errors import UserError
from promptbake.sampling.seam import Sampling, resolve_engine


def test_release_drops_the_held_cache_and_sampling_rebuilds_it(chatml_tok, tiny_model):
    from promptbake.sampling import seam as sampling

    settings = Sampling(max_new_tokens=6, temperature=0)
    first = sample_with(
        tiny_model, chatml_tok, sampling_prompts(chatml_tok), settings, "static"
    ).new_ids
    assert tiny_model._promptbake_static_cache is not None  # kept between batches
    sampling.release(tiny_model)
    assert tiny_model._promptbake_static_cache is None
    again = sample_with(
        tiny_model, chatml_tok, sampling_prompts(chatml_tok), settings, "static"
    ).new_ids
    assert again == first


@pytest.mark.parametrize("vllm_installed", [False, True])
def test_auto_picks_vllm_then_static_on_cuda_and_hf_on_cpu(monkeypatch, vllm_installed):
    import importlib.util

    real = importlib.util.find_spec

    def fake(name, *a):
        if name == "vllm":
            return object() if vllm_installed else None
        return real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    cuda = "vllm" if vllm_installed else "static"
    assert resolve_engine("auto", "cuda") == cuda
    assert resolve_engine("auto", torch.device("cuda:1")) == cuda
    assert resolve_engine("auto", "cpu") == "hf"


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_context_too_long_is_a_user_error(chatml_tok, tiny_model, engine):
    limit = tiny_model.config.max_position_embeddings
    with pytest.raises(UserError, match="context"):
        sample_with(tiny_model, chatml_tok, [[1] * 10], Sampling(max_new_tokens=limit - 9), engine)
