"""Adapters: finding the base model, loading, and the continuous adapter scale (half-baking).

`make_adapter` (a tiny Qwen3 + a LoRA with random nonzero B weights, saved like a bake
run) is shared by the other evaluation tests: training is not the point there.
"""

import copy
import json

import pytest
import torch

from promptbake.adapters import (
    attach_adapter,
    base_model_name,
    load_adapter,
    lora_layers,
    merged_copy,
    set_adapter_scale,
)
from promptbake.configs import LoraArgs
from promptbake.errors import UserError
from promptbake.models import load_model
from promptbake.train import add_lora, save_adapter

TARGETS = "q_proj,k_proj,v_proj,o_proj"


def make_adapter(model_dir, out_dir, seed: int = 0, std: float = 0.5):
    """Save a LoRA adapter with random (nonzero) B weights for the model in `model_dir`."""
    model, _ = load_model(str(model_dir), "cpu", "float32")
    peft = add_lora(model, LoraArgs(r=4, lora_alpha=8.0, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(peft, out_dir)
    return out_dir


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


IDS = torch.tensor([[5, 17, 99, 230, 7, 64, 301, 12]])


def test_scale_zero_is_the_base_model_exactly(tiny_model_dir, adapter):
    base, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    ref = logits(base, IDS)
    peft = attach_adapter(copy.deepcopy(base), adapter).eval()
    baked = logits(peft, IDS)
    assert (baked - ref).abs().max() > 1e-3  # the adapter does something
    set_adapter_scale(peft, 0.0)
    assert torch.equal(logits(peft, IDS), ref)  # bit for bit
    set_adapter_scale(peft, 1.0)
    assert torch.equal(logits(peft, IDS), baked)  # and back, without drift


def test_scale_multiplies_each_lora_update(tiny_model_dir, adapter):
    peft, _, _ = load_adapter(adapter, device="cpu", dtype="float32")
    layer = lora_layers(peft)[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = layer.base_layer(x)
        deltas = {}
        for s in (0.5, 1.0, 1.5):
            set_adapter_scale(peft, s)
            deltas[s] = layer(x) - base_out
    assert deltas[1.0].abs().max() > 1e-3
    torch.testing.assert_close(deltas[0.5], 0.5 * deltas[1.0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deltas[1.5], 1.5 * deltas[1.0], rtol=1e-5, atol=1e-6)


def test_merged_copy_honours_the_scale_and_leaves_the_original(tiny_model_dir, adapter):
    peft, _, _ = load_adapter(adapter, device="cpu", dtype="float32")
    set_adapter_scale(peft, 0.5)
    want = logits(peft, IDS)
    merged = merged_copy(peft)
    assert not lora_layers(merged)
    torch.testing.assert_close(logits(merged, IDS), want, atol=1e-4, rtol=1e-4)
    assert lora_layers(peft)  # the PeftModel still has its adapter
    torch.testing.assert_close(logits(peft, IDS), want)


def test_base_model_name_sources(tmp_path, adapter, tiny_model_dir):
    # peft records the base model's path in adapter_config.json
    assert base_model_name(adapter) == str(tiny_model_dir)
    assert base_model_name(adapter, "override-model") == "override-model"
    # without it, an epoch_N/ checkpoint falls back to the run's args.json
    run = tmp_path / "run"
    ep = run / "epoch_2"
    ep.mkdir(parents=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (ep / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="--model_name"):
        base_model_name(ep)
    (run / "args.json").write_text(json.dumps({"model_name": "smollm2-135m"}))
    assert base_model_name(ep) == "smollm2-135m"


def test_bad_adapter_dirs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        base_model_name(tmp_path / "missing")
    (tmp_path / "epoch_1").mkdir()
    (tmp_path / "epoch_1" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="epoch_N"):
        base_model_name(tmp_path)


def test_scale_without_adapter(tiny_model):
    set_adapter_scale(tiny_model, 1.0)  # a no-op
    with pytest.raises(UserError, match="needs an adapter"):
        set_adapter_scale(tiny_model, 0.5)
