"""Integration on the bundled SmolLM2-135M-Instruct: sample persona trajectories, bake them.

    python -m pytest tests/test_integration_smollm.py -q      # ~2 min on 2 busy CPU cores

A small, fixed-seed bake of "Your name is Zorblax." (12 identity questions x 2 answers x
16 new tokens, r=8, lora_alpha=16, lr 1e-3, 3 epochs) must close more than half of the
held-out KL gap: KL(prompted || baked) < 0.5 * KL(prompted || base) on trajectories from
questions the adapter never saw (measured: 0.20 vs 0.68 nats/token).
"""

import copy
import json

import pytest

from promptbake.configs import GenerateConfig, TrainConfig
from promptbake.evaluation.measures import heldout_kl
from promptbake.models import end_of_turn_ids
from promptbake.prompts import encode, format_prompt
from promptbake.records import read_questions
from promptbake.sampling.trajectories import generate_trajectories
from promptbake.schema import TRAJECTORY_KEYS, generated_ids, read_meta, read_trajectories
from promptbake.training.loop import train

pytestmark = pytest.mark.slow

X0 = "Your name is Zorblax."
MAX_NEW = 16


def sample(model, tok, questions, path, n_seq, seed):
    cfg = GenerateConfig(
        model_name="smollm2-135m",
        device="cpu",
        x0_file="zorblax_x0.md",
        question_dataset="identity.jsonl",
        traj_out_file=str(path),
        num_questions=len(questions),
        num_sequences_per_question=n_seq,
        max_sequence_length=MAX_NEW,
        batch_size=12,
        seed=seed,
    )
    generate_trajectories(model, tok, cfg, X0, questions, path, progress=False)
    return read_trajectories(path)


@pytest.fixture(scope="module")
def zorblax(smollm, tmp_path_factory, one_thread):
    model, tok = smollm
    d = tmp_path_factory.mktemp("zorblax")
    train_q = read_questions("data/identity_train.jsonl")[:12]
    heldout_q = read_questions("data/identity_heldout.jsonl")[:8]
    train_rows = sample(model, tok, train_q, d / "train.jsonl", 2, seed=0)
    heldout_rows = sample(model, tok, heldout_q, d / "heldout.jsonl", 1, seed=1)
    return d, train_q, train_rows, heldout_rows


def test_persona_trajectories(smollm, zorblax):
    model, tok = smollm
    d, questions, rows, _ = zorblax
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok, model) == [im_end]
    assert read_meta(d / "train.jsonl")["end_of_turn_ids"] == [im_end]
    assert len(rows) == 12 * 2
    ended = 0
    for r in rows:
        assert set(TRAJECTORY_KEYS) <= set(r)
        q = questions[r["question_index"]]["question"]
        assert r["prompt_text"] == format_prompt(X0, q, True, tok)
        assert r["prompt_input_ids"] == encode(tok, r["prompt_text"])
        assert "Your name is Zorblax." in r["prompt_text"]
        assert "Zorblax" not in r["prompt_text_nosys"]  # SmolLM's own default system prompt
        gen = generated_ids(r)
        assert gen == generated_ids(r, nosys=True)
        assert 1 <= len(gen) <= MAX_NEW
        assert im_end not in gen[:-1]
        if len(gen) < MAX_NEW:
            assert gen[-1] == im_end  # stopped early: only at the end of turn
        ended += gen[-1] == im_end
        assert r["text"] == tok.decode(r["input_ids"], skip_special_tokens=False)
        assert r["attention_mask"] == [1] * len(r["input_ids"])
        assert r["generated_text_mask"] == [0] * len(r["prompt_input_ids"]) + [1] * len(gen)
    assert ended >= 1  # some answers really finish with <|im_end|>
    # the prompted model uses the persona
    assert sum("zor" in r["generated_text"].lower() for r in rows) >= 4


def test_small_bake_closes_most_of_the_heldout_gap(smollm, zorblax, tmp_path):
    model, tok = smollm
    _, _, train_rows, heldout_rows = zorblax
    cfg = TrainConfig(
        model_name="smollm2-135m",
        device="cpu",
        data_path="unused.jsonl",
        out_dir=str(tmp_path / "run"),
        num_epochs=3,
        batch_size=6,
        learning_rate=1e-3,
        r=8,
        lora_alpha=16,
        save_every=0,
        plot=False,
        seed=0,
    )
    baked, metrics = train(cfg, copy.deepcopy(model), tok, train_rows, echo=False)
    assert not any("lora" in n for n, _ in model.named_parameters())  # the fixture is untouched
    kls = [m["train_kl"] for m in metrics]
    assert kls[-1] < kls[0]
    res = heldout_kl(baked, tok, heldout_rows)
    print(json.dumps({"train_kl": kls, **res}))
    assert res["kl_base"] > 0.1  # the persona prompt really changes the answers
    assert res["kl_baked"] < 0.5 * res["kl_base"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
