"""Adapters: finding the base model, loading, and the continuous adapter scale (half-baking).

`tiny.make_adapter` builds the adapters (a tiny Qwen3 + a LoRA with random nonzero B
weights, saved like a bake run): training is not the point here.
"""

import copy
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from tiny import IDS, checkpoint_run, logits, make_adapter

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
from promptbake.training.outputs import save_adapter
from promptbake.training.setup import add_lora

TARGETS = "q_proj,k_proj,v_proj,o_proj"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


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
    shutil.copy(adapter / "adapter_model.safetensors", ep)
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


# ---------------------------------------------------------------- saving: offline, modes
@pytest.mark.slow
def test_saving_with_the_bundled_alias_asks_no_hub(tiny_model_dir, tmp_path, hub_blocked):
    """The bundled alias is recorded as the model's name; peft used to ask the Hub about it."""
    from peft import PeftModel

    from promptbake.models import resolve_model_path

    model, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    model.name_or_path = "smollm2-135m"  # what load_model("smollm2-135m") records
    peft = add_lora(model, LoraArgs(r=4, lora_alpha=8.0, target_modules=TARGETS))
    out = tmp_path / "run"
    out.mkdir()
    save_adapter(peft, out)
    assert hub_blocked == []
    config = json.loads((out / "adapter_config.json").read_text())
    local = str(Path(resolve_model_path("smollm2-135m")[0]).resolve())
    assert config["base_model_name_or_path"] == local  # a directory here, not a Hub id
    assert (Path(local) / "config.json").is_file()
    assert base_model_name(out) == "smollm2-135m"  # our record keeps the user's name
    assert peft.peft_config["default"].base_model_name_or_path == "smollm2-135m"  # restored

    base, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    loaded = PeftModel.from_pretrained(base, out).eval()
    assert hub_blocked == []
    torch.testing.assert_close(logits(loaded, IDS), logits(peft.eval(), IDS))


def test_saving_with_a_hub_id_asks_no_hub(tiny_model_dir, tmp_path, hub_blocked):
    model, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    model.name_or_path = "Qwen/Qwen3-1.7B"
    peft = add_lora(model, LoraArgs(r=4, lora_alpha=8.0, target_modules=TARGETS))
    save_adapter(peft, tmp_path)
    assert hub_blocked == []
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen3-1.7B"  # a Hub id stays one


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_adapters_and_checkpoints_follow_the_umask(tiny_model_dir, tmp_path, umask):
    from promptbake.training import checkpoint

    model, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    peft = add_lora(model, LoraArgs(r=4, lora_alpha=8.0, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    old = os.umask(umask)
    try:
        save_adapter(peft, tmp_path)
        ck = checkpoint.save_checkpoint(checkpoint_run(tmp_path, peft, opt, sched), 1)
    finally:
        os.umask(old)
    files = [tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"]
    files += [p for p in ck.iterdir()]
    assert ck / "adapter_model.safetensors" in files and ck / "state.pt" in files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert stat.S_IMODE(ck.stat().st_mode) == 0o777 & ~umask


# ---------------------------------------------------------------- pursuit chains
def _chain_run(tiny_model_dir, root):
    """A two-round pursuit layout: round_2 merges round_1 first."""
    make_adapter(tiny_model_dir, root / "round_1", seed=1)
    make_adapter(tiny_model_dir, root / "round_2", seed=2)
    return root / "round_2"


def test_chain_merges_its_own_rounds_and_names_them(tiny_model_dir, tmp_path, capsys):
    r2 = _chain_run(tiny_model_dir, tmp_path / "pursuit")
    (r2 / "promptbake_chain.json").write_text(json.dumps({"merge_first": ["../round_1"]}))
    base, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    got = logits(attach_adapter(copy.deepcopy(base), r2).eval(), IDS)
    err = capsys.readouterr().err
    assert "round_1" in err and "merging" in err
    r1 = attach_adapter(copy.deepcopy(base), tmp_path / "pursuit" / "round_1").merge_and_unload()
    (r2 / "promptbake_chain.json").unlink()
    want = logits(attach_adapter(r1, r2).eval(), IDS)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("entry", ["ABS", "../../elsewhere/round_1", ".", "../round_2"])
def test_chain_entries_outside_the_run_are_refused(tiny_model_dir, tmp_path, entry):
    r2 = _chain_run(tiny_model_dir, tmp_path / "pursuit")
    make_adapter(tiny_model_dir, tmp_path / "elsewhere" / "round_1", seed=3)
    if entry == "ABS":
        entry = str(tmp_path / "pursuit" / "round_1")  # inside, but absolute: still refused
    (r2 / "promptbake_chain.json").write_text(json.dumps({"merge_first": [entry]}))
    base, _ = load_model(str(tiny_model_dir), "cpu", "float32")
    with pytest.raises(UserError, match="outside this pursuit run"):
        attach_adapter(base, r2)
