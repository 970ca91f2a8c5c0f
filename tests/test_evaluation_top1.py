"""Top-1 agreement (evaluation/measures.py): the share of generated positions where a
student's argmax token is the teacher's, on the rows and conditions of condition_kl.

    python -m pytest tests/test_evaluation_top1.py -q
"""

from __future__ import annotations

import pytest
import torch

from promptbake.configs import LoraArgs
from promptbake.evaluation import measures
from promptbake.evaluation.conditions import CONDITIONS
from promptbake.models import pad_id
from promptbake.prompts import encode, format_prompt
from promptbake.schema import make_trajectory
from promptbake.training.setup import add_lora

X0 = "Your name is Zorblax. Always answer in capitals."
QUESTIONS = ["Who are you?", "What is your name?", "Where do rivers go?", "Name a color."]


def make_rows(tok, n_seq=2, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in QUESTIONS:
        p = encode(tok, format_prompt(X0, q, True, tok))
        p0 = encode(tok, format_prompt(X0, q, False, tok))
        for _ in range(n_seq):
            n = int(torch.randint(3, 9, (1,), generator=g))
            gen = torch.randint(10, len(tok) - 30, (n,), generator=g).tolist()
            rows.append(make_trajectory(tok, p, p0, gen, question=q))
    return rows


def contextual(model):
    """The random tiny model's argmax hardly depends on the context (0.002 nats of KL
    between prompted and base, every argmax the same): amplify its attention output so
    the prompt moves some of them."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(5.0)
            layer.self_attn.o_proj.weight.mul_(5.0)
    return model


def argmax_rows(model, rec: dict, sfx: str) -> torch.Tensor:
    """Argmax of full logits of one side of a trajectory at the rows predicting its
    generated tokens (the reference: one trajectory at a time, no chunks)."""
    ids = torch.tensor([rec["input_ids" + sfx]])
    mask = torch.tensor(rec["generated_text_mask" + sfx], dtype=torch.bool)
    return model(input_ids=ids).logits[0, mask.nonzero()[:, 0] - 1].argmax(-1)


def test_agreement_with_itself_is_one_and_base_matches_a_full_logit_reference(
    tiny_model, chatml_tok
):
    rows = make_rows(chatml_tok)
    model = contextual(tiny_model)
    prompted = (model, CONDITIONS["prompted"])
    students = {"same": prompted, "base": (model, CONDITIONS["base"])}
    got = measures.condition_scores(prompted, students, rows, pad_id(chatml_tok), 3, 4)
    assert got["same"]["top1"] == 1.0 and got["same"]["kl"] == pytest.approx(0.0, abs=1e-6)
    agree = n = 0
    with torch.no_grad():
        for rec in rows:
            t, s = argmax_rows(model, rec, ""), argmax_rows(model, rec, "_nosys")
            agree += int((t == s).sum())
            n += t.numel()
    assert got["base"]["positions"] == n
    assert got["base"]["top1"] == pytest.approx(agree / n)
    assert got["base"]["top1"] < 1.0  # the prompt moves some argmax tokens
    assert measures.top1_agreement(prompted, students, rows, pad_id(chatml_tok)) == {
        "same": 1.0, "base": pytest.approx(agree / n)
    }  # fmt: skip
    kl = measures.condition_kl(prompted, students, rows, pad_id(chatml_tok))
    assert kl["base"] == pytest.approx(got["base"]["kl"], rel=1e-5)


def test_a_fresh_adapter_agrees_with_base(tiny_model, chatml_tok):
    """A new LoRA (B = 0) changes nothing: baked and base agree at every position."""
    rows = make_rows(chatml_tok, n_seq=1)
    lora = LoraArgs(r=2, lora_alpha=4.0, target_modules="q_proj,v_proj")
    model = add_lora(contextual(tiny_model), lora)
    students = {"baked": (model, CONDITIONS["baked"]), "prompted": (model, CONDITIONS["prompted"])}
    got = measures.top1_agreement((model, CONDITIONS["base"]), students, rows, 0)
    assert got["baked"] == 1.0 and got["prompted"] < 1.0


def test_hand_computed_agreement(monkeypatch):
    """Teacher argmax 0 1 2 3 | 4 0; student 0 1 0 0 | 4 1: 3 of 6 positions agree."""

    def onehot(ids):
        return torch.nn.functional.one_hot(torch.tensor(ids), 5).float().add(0.1).log()

    chunks = [
        ("s", onehot([0, 1, 2, 3]), onehot([0, 1, 0, 0])),
        ("s", onehot([4, 0]), onehot([4, 1])),
    ]
    monkeypatch.setattr(measures, "paired_logprobs", lambda *a, **k: iter(chunks))
    got = measures.condition_scores(None, {"s": None}, [], 0)
    assert got["s"]["top1"] == pytest.approx(0.5) and got["s"]["positions"] == 6
    assert measures.top1_agreement(None, {"s": None}, [], 0) == {"s": pytest.approx(0.5)}
