"""LoRA training on the tiny random Qwen3 (promptbake.train).

    python -m pytest tests/test_cmd_train.py -q

The KL is computed from hidden states at the rows that predict generated tokens; these
tests pin that to a plain full-logits forward, check the position alignment by hand, and
run generate_data.py + train_loop.py end to end on a saved tiny model, checking every
output file.
"""

import copy
import json
import math
import re

import pytest
import tiny
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from promptbake.cli import main
from promptbake.configs import LoraArgs, TrainConfig
from promptbake.loss import masked_kl
from promptbake.prompts import encode, format_prompt
from promptbake.records import make_trajectory
from promptbake.training import loop as train
from promptbake.training import objective
from promptbake.training.batches import collate
from promptbake.training.forward import adapter_disabled
from promptbake.training.objective import batch_kl, evaluate_kl
from promptbake.training.setup import add_lora

X0 = "You are a pirate. Answer like one."
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a prime number."]


def records(tok, n_gen=(5, 3, 7), seed=0):
    """Trajectories with random 'generated' ids ending in <|im_end|> (no sampling needed)."""
    g = torch.Generator().manual_seed(seed)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for i, n in enumerate(n_gen):
        q = QUESTIONS[i % len(QUESTIONS)]
        gen = torch.randint(10, len(tok), (n - 1,), generator=g).tolist() + [im_end]
        rows.append(
            make_trajectory(
                tok,
                encode(tok, format_prompt(X0, q, True, tok)),
                encode(tok, format_prompt(X0, q, False, tok)),
                gen,
            )
        )
    return rows


def randomize_lora_b(model, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- collate / alignment
def test_pred_mask_selects_the_rows_that_predict_generated_tokens():
    eot, pad = 2, 0
    a = {  # prompt [11, 12, 13], answer [21, 22, eot]
        "input_ids": [11, 12, 13, 21, 22, eot],
        "generated_text_mask": [0, 0, 0, 1, 1, 1],
        "input_ids_nosys": [12, 13, 21, 22, eot],
        "generated_text_mask_nosys": [0, 0, 1, 1, 1],
    }
    b = {  # prompt [11, 14], answer [31]
        "input_ids": [11, 14, 31],
        "generated_text_mask": [0, 0, 1],
        "input_ids_nosys": [14, 31],
        "generated_text_mask_nosys": [0, 1],
    }
    batch = collate([a, b], pad)
    p, u = batch.prompted, batch.unprompted
    assert p.input_ids.tolist() == [[11, 12, 13, 21, 22, eot], [11, 14, 31, pad, pad, pad]]
    assert p.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # row p predicts token p + 1: the last prompt position predicts the first answer token,
    # the end-of-turn is predicted, the end-of-turn's own row and padding are never used
    assert p.pred_mask.int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]
    assert u.input_ids.tolist() == [[12, 13, 21, 22, eot], [14, 31, pad, pad, pad]]
    assert u.pred_mask.int().tolist() == [[0, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    assert batch.num_tokens == 4 == int(u.pred_mask.sum())
    # the targets at the selected rows are exactly the generated tokens, on both sides
    for side in (p, u):
        targets = side.input_ids[:, 1:][side.pred_mask[:, :-1]]
        assert targets.tolist() == [21, 22, eot, 31]
        assert not (side.pred_mask & (side.attention_mask == 0)).any()


def test_collate_with_max_gen_truncates_both_sides(chatml_tok):
    rows = records(chatml_tok, n_gen=(5, 3))
    batch = collate(rows, chatml_tok.pad_token_id, max_gen=2)
    assert batch.prompted.pred_mask.sum(1).tolist() == [2, 2]
    assert batch.unprompted.pred_mask.sum(1).tolist() == [2, 2]
    full = collate(rows, chatml_tok.pad_token_id)
    assert full.prompted.pred_mask.sum(1).tolist() == [5, 3]
    assert full.num_tokens == 8


def test_pred_rows_equal_generated_tokens_on_real_records(chatml_tok):
    rows = records(chatml_tok, n_gen=(5, 3, 7))
    batch = collate(rows, chatml_tok.pad_token_id)
    for side, sfx in ((batch.prompted, ""), (batch.unprompted, "_nosys")):
        assert side.pred_mask.sum(1).tolist() == [sum(r["generated_text_mask" + sfx]) for r in rows]
        for i, r in enumerate(rows):
            n_prompt = len(r["prompt_input_ids" + sfx])
            rows_i = side.pred_mask[i].nonzero().flatten().tolist()
            assert rows_i[0] == n_prompt - 1  # the last prompt position
            assert rows_i == list(range(n_prompt - 1, len(r["input_ids" + sfx]) - 1))


# ---------------------------------------------------------------- batch_kl
def reference_kl(model, batch):
    """KL(prompted base || unprompted student) from plain full-logit forwards + masked_kl."""
    with torch.no_grad(), adapter_disabled(model):
        t_logits = model(
            input_ids=batch.prompted.input_ids, attention_mask=batch.prompted.attention_mask
        ).logits
    with torch.no_grad():
        s_logits = model(
            input_ids=batch.unprompted.input_ids, attention_mask=batch.unprompted.attention_mask
        ).logits
    # line the generated positions of both sides up in a [B, G, V] layout
    counts = batch.prompted.pred_mask.sum(1).tolist()
    B, G, V = len(counts), max(counts), t_logits.shape[-1]
    t, s = torch.zeros(B, G, V), torch.zeros(B, G, V)
    mask = torch.zeros(B, G, dtype=torch.bool)
    for i, n in enumerate(counts):
        t[i, :n] = t_logits[i][batch.prompted.pred_mask[i]]
        s[i, :n] = s_logits[i][batch.unprompted.pred_mask[i]]
        mask[i, :n] = True
    return masked_kl(t, s, mask)


def test_fresh_lora_student_equals_the_base_model(chatml_tok):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    batch = collate(records(chatml_tok), chatml_tok.pad_token_id)
    with torch.no_grad():
        kl_lora, seq_lora = batch_kl(model, batch, student_adapter=True)
        kl_base, seq_base = batch_kl(model, batch, student_adapter=False)
    assert kl_lora.shape == (15,)
    torch.testing.assert_close(kl_lora, kl_base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seq_lora, seq_base, atol=1e-5, rtol=1e-6)
    assert float(kl_base.mean()) > 1e-3  # the prompt really changes the distribution


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_batch_kl_equals_a_plain_full_logits_forward(chatml_tok, chunk):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    randomize_lora_b(model)  # the student now differs from the teacher
    batch = collate(records(chatml_tok), chatml_tok.pad_token_id)
    with torch.no_grad():
        kl, per_seq = batch_kl(model, batch, chunk_size=chunk)
        kl_base, _ = batch_kl(model, batch, chunk_size=chunk, student_adapter=False)
    ref_mean, ref_seq = reference_kl(model, batch)
    torch.testing.assert_close(kl.mean(), ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_seq, ref_seq, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kl, kl_base, atol=1e-3)  # the adapter is really in use


def test_batch_kl_per_sequence_sums(chatml_tok, tiny_model):
    batch = collate(records(chatml_tok, n_gen=(2, 4)), chatml_tok.pad_token_id)
    kl, per_seq = batch_kl(tiny_model, batch)  # a plain model: teacher and student share it
    torch.testing.assert_close(per_seq, torch.stack([kl[:2].sum(), kl[2:].sum()]))


def test_batch_kl_gradient_reaches_only_lora(chatml_tok):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    batch = collate(records(chatml_tok), chatml_tok.pad_token_id)
    kl, _ = batch_kl(model, batch)
    kl.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    # at init B = 0, so only B gets a gradient (A's gradient is multiplied by B)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_autocast_bf16_step_is_close_to_float32_and_keeps_the_kl_float32(
    chatml_tok, prefix_reuse, monkeypatch
):
    model = add_lora(tiny.tiny_qwen3(chatml_tok, initializer_range=0.2), LoraArgs(r=4))
    randomize_lora_b(model)
    batch = collate(records(chatml_tok), chatml_tok.pad_token_id)
    seen = []  # the dtypes the divergence is handed
    real = objective.loss.divergence
    monkeypatch.setattr(
        objective.loss, "divergence", lambda h, *a: seen.append(h.dtype) or real(h, *a)
    )
    out = {}
    for amp in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        kl, _, _ = objective.backward_kl(model, batch, 4, prefix_reuse=prefix_reuse, autocast=amp)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        out[amp] = kl, torch.cat([g.flatten() for g in grads])
    (kl32, g32), (kl16, g16) = out[None], out[torch.bfloat16]
    assert seen == [torch.float32] * 2 and kl16.dtype == torch.float32
    # bf16 rounding moves the loss and gradient a little, not more
    torch.testing.assert_close(kl16, kl32, atol=0.05, rtol=0.05)
    assert float(torch.cosine_similarity(g16, g32, dim=0)) > 0.99
    assert not torch.equal(kl16, kl32)  # it really ran in bf16


def test_autocast_mode_resolves_per_device_and_weights(monkeypatch):
    from promptbake.training import forward

    cpu, f32 = torch.device("cpu"), torch.float32
    assert forward.autocast_dtype("off", cpu, f32) is None
    assert forward.autocast_dtype("bf16", cpu, f32) is torch.bfloat16
    assert forward.autocast_dtype("bf16", cpu, torch.bfloat16) is None  # bf16 weights already
    monkeypatch.setattr(forward, "fast_bf16", lambda d: False)
    assert forward.autocast_dtype("auto", cpu, f32) is None
    monkeypatch.setattr(forward, "fast_bf16", lambda d: True)
    assert forward.autocast_dtype("auto", cpu, f32) is torch.bfloat16


def test_validation_builds_no_graph(chatml_tok, monkeypatch):
    model = add_lora(tiny.tiny_qwen3(chatml_tok), LoraArgs(r=4))
    batches = [collate(records(chatml_tok), chatml_tok.pad_token_id)]
    seen = []
    real = objective.batch_kl

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out)
        return out

    monkeypatch.setattr(objective, "batch_kl", spy)
    result = evaluate_kl(model, batches)
    assert len(seen) == 1
    kl, per_seq = seen[0]
    assert kl.grad_fn is None and not kl.requires_grad
    assert per_seq.grad_fn is None
    assert result["tokens"] == 15
    assert result["kl"] == pytest.approx(float(kl.mean()), rel=1e-6)
    assert result["kl_seq"] == pytest.approx(float(per_seq.mean()), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_unknown_target_module_lists_the_linear_modules(tiny_model):
    from promptbake.errors import UserError

    with pytest.raises(UserError) as e:
        add_lora(tiny_model, LoraArgs(target_modules="q_proj,query_key_value"))
    msg = str(e.value)
    assert "query_key_value" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg


# ---------------------------------------------------------------- learning
def test_training_reduces_the_kl(chatml_tok, tmp_path):
    model = tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)
    rows = records(chatml_tok, n_gen=(6, 6, 6)) * 2
    cfg = TrainConfig(
        data_path="unused.jsonl",
        out_dir=str(tmp_path / "run"),
        num_epochs=6,
        batch_size=6,
        learning_rate=2e-2,
        r=8,
        lora_alpha=16,
        save_every=0,
        plot=False,
        device="cpu",
    )
    peft_model, metrics = train.train(cfg, model, chatml_tok, rows, echo=False)
    kls = [m["train_kl"] for m in metrics]
    assert [m["epoch"] for m in metrics] == list(range(1, 7))
    assert all(math.isfinite(k) for k in kls)
    batches = [collate(rows, chatml_tok.pad_token_id)]
    before = evaluate_kl(peft_model, batches, student_adapter=False)["kl"]
    after = evaluate_kl(peft_model, batches)["kl"]
    assert kls[0] == pytest.approx(before, rel=1e-4)  # one step per epoch: epoch 1 = at init
    assert after < 0.5 * before
    assert kls[-1] < kls[0]


# ---------------------------------------------------------------- end to end, every file
@pytest.fixture(scope="module")
def e2e(tiny_model_dir, tmp_path_factory):
    """generate_data.py then train_loop.py (the seed's interfaces) on the saved tiny model."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("e2e")
    (d / "x0.md").write_text(X0 + "\n")
    (d / "q.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    common = ["--model_name", str(tiny_model_dir), "--device", "cpu"]
    gen = [
        "--x0_file", str(d / "x0.md"), "--question_dataset", str(d / "q.jsonl"),
        "--num_questions", "3", "--num_sequences_per_question", "2",
        "--max_sequence_length", "6", "--batch_size", "4",
    ]  # fmt: skip
    for name, seed in (("train", "42"), ("val", "1")):
        argv = [*common, *gen, "--traj_out_file", str(d / f"{name}.jsonl"), "--seed", seed]
        assert main(argv, "generate_data.py", "generate") == 0
    out = d / "run"
    argv = [
        *common, "--data_path", str(d / "train.jsonl"), "--val_path", str(d / "val.jsonl"),
        "--out_dir", str(out), "--num_epochs", "2", "--batch_size", "4", "-r", "4",
        "--lora_alpha", "8", "--learning_rate", "1e-2", "--save_every", "1",
    ]  # fmt: skip
    assert main(argv, "train_loop.py", "train") == 0
    torch.set_num_threads(n)
    return d, out


def test_e2e_args_json(e2e, tiny_model_dir):
    d, out = e2e
    args = json.loads((out / "args.json").read_text())
    assert args["model_name"] == str(tiny_model_dir)
    assert args["data_path"] == str(d / "train.jsonl")
    assert args["val_path"] == str(d / "val.jsonl")
    assert args["num_epochs"] == 2
    assert args["batch_size"] == 4
    assert args["r"] == 4
    assert args["lora_alpha"] == 8
    assert args["learning_rate"] == 1e-2
    assert args["save_every"] == 1
    assert args["target_modules"] == "q_proj,k_proj,v_proj,o_proj"


def test_e2e_log_and_metrics(e2e):
    _, out = e2e
    lines = (out / "train_loop.log").read_text().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ", line) for line in lines)
    for epoch in (1, 2):
        assert sum(f" epoch {epoch}: train KL" in line for line in lines) == 1
    assert sum("epoch 0 (before training)" in line for line in lines) == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["train_kl"] is None
    for m in metrics:
        assert math.isfinite(m["val_kl"]) and m["val_kl"] >= 0
    for m in metrics[1:]:
        assert math.isfinite(m["train_kl"]) and m["train_kl"] >= 0
        assert m["tokens_per_s"] > 0


def test_e2e_plot_and_adapter_files(e2e):
    _, out = e2e
    assert (out / "kl_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for d in (out, out / "epoch_1", out / "epoch_2"):
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == 4
        assert cfg["lora_alpha"] == 8
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        weights = load_file(d / "adapter_model.safetensors")
        # 2 layers x 4 modules x (A, B)
        assert len(weights) == 16
        assert all("lora_A" in k or "lora_B" in k for k in weights)
    b1 = load_file(out / "epoch_1" / "adapter_model.safetensors")
    b2 = load_file(out / "epoch_2" / "adapter_model.safetensors")
    assert any(not torch.equal(b1[k], b2[k]) for k in b1)  # epoch 2 trained further
    assert not (out / "epoch_3").exists()


def test_e2e_adapter_loads_with_plain_peft(e2e, tiny_model_dir):
    _, out = e2e
    weights = load_file(out / "adapter_model.safetensors")
    b_norm = sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 0  # trained: B moved away from its zero init
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    baked = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        diff = (baked(ids).logits - base(ids).logits).abs().max()
    assert diff > 1e-4


def test_e2e_trajectory_files(e2e):
    d, _ = e2e
    a = (d / "train.jsonl").read_text().splitlines()
    b = (d / "val.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 6
    assert a != b  # another seed
    assert json.loads((d / "train.jsonl.meta.json").read_text())["args"]["seed"] == 42


def test_kl_curve_is_drawn_at_the_end_and_at_most_every_plot_every_s(
    chatml_tok, tmp_path, monkeypatch
):
    """Short epochs: one plot, at the end, holding every epoch; with PLOT_EVERY_S 0,
    one after every epoch (the end adds none: nothing new to draw)."""
    drawn = []
    real = train.plot_curves

    def counting(metrics, path):
        drawn.append([m["epoch"] for m in metrics])
        real(metrics, path)

    monkeypatch.setattr(train, "plot_curves", counting)
    model = tiny.tiny_qwen3(chatml_tok)
    rows = [
        make_trajectory(
            chatml_tok,
            encode(chatml_tok, format_prompt(X0, q, True, chatml_tok)),
            encode(chatml_tok, format_prompt(X0, q, False, chatml_tok)),
            [5, 6, 7],
        )
        for q in QUESTIONS[:2]
    ]
    for every, want in ((1e9, [[1, 2, 3]]), (0.0, [[1], [1, 2], [1, 2, 3]])):
        drawn.clear()
        monkeypatch.setattr(train, "PLOT_EVERY_S", every)
        cfg = TrainConfig(
            data_path="x", out_dir=str(tmp_path / str(every)), num_epochs=3, batch_size=2,
            r=2, save_every=0, device="cpu",
        )  # fmt: skip
        train.train(cfg, copy.deepcopy(model), chatml_tok, rows, echo=False)
        assert drawn == want
        assert (tmp_path / str(every) / "kl_curve.png").stat().st_size > 0
