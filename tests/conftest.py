"""Shared fixtures: an offline ChatML tokenizer and tiny random-weight Qwen3 models, and the
fixtures more than one test file uses (a trajectory file, a baked run, a blocked Hub).

No test may touch the network: the offline switches below are set before transformers is imported,
and all models/tokenizers come from tests/tiny.py (imported as `tiny`), built in-process. Helpers
that are not fixtures (rows, adapters, command-line checks) are in tiny.py too: no test module
imports another.
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


@pytest.fixture
def peaky_model(chatml_tok):
    """A tiny Qwen3 with larger weights: peaked next-token distributions, so the greedy
    argmax is far from ties."""
    return tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """A trajectory file (+ sidecar) from the tiny model, as generate_data.py writes it."""
    import torch

    from promptbake.configs import GenerateConfig
    from promptbake.sampling.trajectories import generate_trajectories

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("traj")
    tok = tiny.chatml_tokenizer("tiny")
    cfg = GenerateConfig(
        num_questions=3,
        num_sequences_per_question=2,
        max_sequence_length=4,
        batch_size=6,
        x0_file="x0.md",
        question_dataset="q.jsonl",
        traj_out_file=str(d / "t.jsonl"),
    )
    questions = [{"question": q} for q in tiny.PIRATE_QUESTIONS]
    generate_trajectories(
        tiny.tiny_qwen3(tok), tok, cfg, "You are a pirate.", questions, d / "t.jsonl",
        progress=False,
    )  # fmt: skip
    torch.set_num_threads(n)
    return d / "t.jsonl"


@pytest.fixture(scope="module")
def resume_inputs(tmp_path_factory):
    """A prompt and 10 questions (tiny.RESUME_QUESTIONS) for runs that get interrupted."""
    import json

    d = tmp_path_factory.mktemp("inputs")
    (d / "x0.md").write_text("You are a pirate. Always say arr.\n")
    (d / "q.jsonl").write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in tiny.RESUME_QUESTIONS)
    )
    return d


@pytest.fixture(scope="module")
def baked_run(tiny_model_dir, tmp_path_factory):
    """A bake-like run directory: adapter + validation trajectories (with .meta.json)."""
    from promptbake.models import load_model

    d = tiny.make_adapter(tiny_model_dir, tmp_path_factory.mktemp("run"), seed=1)
    model, tok = load_model(str(tiny_model_dir), "cpu", "float32")
    tiny.sample_heldout(model, tok, d / "trajectories_val.jsonl")
    return d


@pytest.fixture
def hub_blocked(monkeypatch):
    """Every network path raises and is recorded; the offline switches are off, so a
    library that would ask the Hub really tries (and the list shows it)."""
    import socket

    import huggingface_hub
    import peft.utils.other
    import peft.utils.save_and_load

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network blocked by the test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for mod in (huggingface_hub, peft.utils.other, peft.utils.save_and_load):
        for fn in ("file_exists", "hf_hub_download", "model_info"):
            if hasattr(mod, fn):
                monkeypatch.setattr(mod, fn, refuse)
    return attempts
