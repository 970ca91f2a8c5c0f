"""Scores of trajectories (promptbake.evaluation.measures): held-out KL between conditions
against a full-logit reference, one trajectory at a time.

    python -m pytest tests/test_evaluation_measures.py -q
"""

import pytest
import torch

from promptbake.adapters import load_adapter
from promptbake.schema import read_trajectories


def kl_rows_logits(model, rec: dict, sfx: str) -> torch.Tensor:
    """Full logits of one side of a trajectory at the rows that predict generated tokens."""
    ids = torch.tensor([rec["input_ids" + sfx]])
    mask = torch.tensor(rec["generated_text_mask" + sfx], dtype=torch.bool)
    return model(input_ids=ids).logits[0, mask.nonzero()[:, 0] - 1]


def test_heldout_kl_matches_a_full_logit_reference(baked_run):
    """evaluate.condition_kl (chunked LM head, any two (model, condition) pairs) against
    the KL of full logits, one trajectory at a time, and pursuit's two-model form."""
    from promptbake.evaluation.measures import heldout_kl
    from promptbake.loss import token_kl
    from promptbake.pursue import cross_model_kl

    model, tok, _ = load_adapter(baked_run, device="cpu", dtype="float32")
    rows = read_trajectories(baked_run / "trajectories_val.jsonl")
    got = heldout_kl(model, tok, rows, batch_size=3, chunk_size=4)
    total = {"base": 0.0, "baked": 0.0}
    n = 0
    with torch.no_grad():
        for rec in rows:
            with model.disable_adapter():
                t, base = kl_rows_logits(model, rec, ""), kl_rows_logits(model, rec, "_nosys")
            baked = kl_rows_logits(model, rec, "_nosys")
            total["base"] += float(token_kl(t, base).sum())
            total["baked"] += float(token_kl(t, baked).sum())
            n += t.shape[0]
    assert got["kl_base"] == pytest.approx(total["base"] / n, rel=1e-4)
    assert got["kl_baked"] == pytest.approx(total["baked"] / n, rel=1e-4)
    assert got["kl_baked"] != pytest.approx(got["kl_base"], rel=1e-3)  # the adapter counts
    assert cross_model_kl(model, model, tok, rows) == pytest.approx(got["kl_baked"], rel=1e-4)
