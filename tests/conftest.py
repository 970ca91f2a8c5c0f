"""Shared fixtures: an offline ChatML tokenizer and tiny random-weight Qwen3 models.

No test may touch the network: the offline switches below are set before transformers is imported,
and all models/tokenizers come from tests/tiny.py (imported as `tiny`), built in-process.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread per process, subprocesses included: the test models are tiny (threads
# gain nothing) and on a shared 2-core box OpenMP spinning made them 5-60x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs with one torch thread (see OMP_NUM_THREADS above)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def chatml_tok():
    """A fresh tiny ChatML tokenizer (cheap: the trained backend is cached), safe to mutate."""
    return tiny.chatml_tokenizer("tiny")


@pytest.fixture
def tiny_model(chatml_tok):
    """A fresh 2-layer random Qwen3 (seed 0, float32, eval mode) matching ``chatml_tok``."""
    return tiny.tiny_qwen3(chatml_tok)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory with ``tiny_qwen3(seed=0)`` + tiny tokenizer, loadable by ``from_pretrained``."""
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), kind="tiny", seed=0)


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, float32 on CPU, loaded once.

    Tests using it are integration tests: mark them ``@pytest.mark.slow``. Do not leave a
    LoRA adapter attached to this shared model: wrap a ``copy.deepcopy`` instead.
    """
    import torch

    from promptbake.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu", dtype="float32")
