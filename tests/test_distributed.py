"""Data parallelism: 2 processes on gloo (CPU) give what 1 process gives.

    pytest tests/test_distributed.py -q

The end-to-end tests (marked slow) launch ``torchrun --standalone --nproc_per_node 2`` on
the tiny random Qwen3 (``tiny_model_dir``): generation must write the very same file as one
process (each rank sampling a disjoint share of the batches), and training the same
losses and adapter (each rank taking half of every global batch), also with the layers
sharded by FSDP2 (``--fsdp true``, on gloo) and when resuming an FSDP checkpoint. The
other tests check the sharding and loss-weighting rules in one process, without a
process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptbake import distributed
from promptbake import train as train_command
from promptbake.configs import GenerateConfig, LoraArgs, TrainConfig
from promptbake.errors import UserError
from promptbake.files import write_json
from promptbake.generate import run_generate
from promptbake.models import load_model, load_tokenizer, tokenizer_fingerprint
from promptbake.records import read_prompt, read_questions, select_questions
from promptbake.sampling.trajectories import _resume_key
from promptbake.schema import read_trajectories
from promptbake.training import batches, checkpoint, objective, setup

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the sky made of?",
    "How are you today?",
    "Name a color.",
    "What is two plus two?",
    "Tell me a joke.",
    "Where is Paris?",
    "Who wrote Hamlet?",
]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (a free port; no clash with other tests)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*cmd, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a hung run (mismatched collectives): SIGTERM makes torchrun stop its workers,
        # which run in sessions of their own (a SIGKILL would leave them spinning)
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"torchrun hung for {timeout} s:\n{out[-3000:]}{err[-3000:]}")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def flags(cfg) -> list[str]:
    # `-r`, not `--r`: torchrun's own parser rejects `--r` as an ambiguous abbreviation
    out = [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None and k != "r"]
    return out + (["-r", str(cfg.r)] if hasattr(cfg, "r") else [])


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One process's trajectory file (21 rows in 6 batches: 4, 4, 4, 4, 4, 1) and its config."""
    d = tmp_path_factory.mktemp("dist")
    (d / "x0.md").write_text("You are a pirate. Always say arr.\n")
    (d / "q.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    cfg = GenerateConfig(
        model_name=str(tiny_model_dir),
        x0_file=str(d / "x0.md"),
        question_dataset=str(d / "q.jsonl"),
        num_questions=7,
        num_sequences_per_question=3,
        batch_size=4,
        max_sequence_length=16,
        traj_out_file=str(d / "one.jsonl"),
    )
    run_generate(cfg)
    return d, cfg


@pytest.mark.slow
def test_generation_on_two_processes_writes_the_single_process_file(reference):
    d, cfg = reference
    out = d / "two.jsonl"
    cfg2 = GenerateConfig(**{**vars(cfg), "traj_out_file": str(out)})
    res = torchrun("-m", "promptbake.cli", "generate", *flags(cfg2))
    assert out.read_bytes() == (d / "one.jsonl").read_bytes()
    # 21 rows in total: the ranks shared the batches instead of each sampling all of them
    assert "Generated 21 trajectories" in res.stdout
    assert res.stdout.count("Dataset saved") == 1  # only rank 0 prints
    meta = json.loads((d / "two.jsonl.meta.json").read_text())
    assert meta["num_trajectories"] == 21
    assert sorted(p.name for p in d.glob("two.jsonl*")) == ["two.jsonl", "two.jsonl.meta.json"]


def seed_interrupted_run(cfg: GenerateConfig, out: Path) -> None:
    """What a 2-process run killed after one batch per rank leaves behind: the resume key
    and a shard per rank (batch 0 on rank 0; batch 1 and half a line of batch 3 on rank 1)."""
    ref = (Path(cfg.traj_out_file)).read_bytes().splitlines(keepends=True)
    model, tok = load_model(cfg.model_name, cfg.device, cfg.dtype)
    key = _resume_key(
        GenerateConfig(**{**vars(cfg), "traj_out_file": str(out)}),
        tokenizer_fingerprint(tok),
        read_prompt(cfg.x0_file),
        select_questions(read_questions(cfg.question_dataset), cfg.num_questions, cfg.seed),
        model,
    )
    write_json(f"{out}.partial.key.json", {**key, "world_size": 2})
    Path(f"{out}.partial.rank0").write_bytes(b"".join(ref[0:4]))
    Path(f"{out}.partial.rank1").write_bytes(b"".join(ref[4:8]) + ref[12][:30])


@pytest.mark.slow
def test_two_processes_resume_their_shards(reference):
    d, cfg = reference
    out = d / "resumed.jsonl"
    seed_interrupted_run(cfg, out)
    cfg2 = GenerateConfig(**{**vars(cfg), "traj_out_file": str(out)})
    res = torchrun("-m", "promptbake.cli", "generate", *flags(cfg2))
    assert out.read_bytes() == (d / "one.jsonl").read_bytes()
    assert res.stdout.count("1/3 batches already done") == 2  # each rank resumed its shard
    assert "Generated 13 trajectories" in res.stdout  # only the 21 - 8 missing ones
    assert sorted(p.name for p in d.glob("resumed.jsonl*")) == [
        "resumed.jsonl",
        "resumed.jsonl.meta.json",
    ]


def test_resuming_with_another_process_count_is_refused(reference):
    d, cfg = reference
    out = d / "refused.jsonl"
    seed_interrupted_run(cfg, out)
    before = Path(f"{out}.partial.rank1").read_bytes()
    with pytest.raises(UserError, match=r"made by 2 process\(es\), this one has 1.*nproc_per_node"):
        run_generate(GenerateConfig(**{**vars(cfg), "traj_out_file": str(out)}))
    assert Path(f"{out}.partial.rank1").read_bytes() == before


@pytest.fixture(scope="module")
def one_process_training(reference, tiny_model_dir, tmp_path_factory):
    """A 3-epoch single-process run: (config, metrics, out_dir)."""
    d, _ = reference
    rows = (d / "one.jsonl").read_text().splitlines(keepends=True)
    (d / "val.jsonl").write_text("".join(rows[:9]))  # 5 + 4 rows: 2 + 1 batches
    (d / "val.jsonl.meta.json").write_text((d / "one.jsonl.meta.json").read_text())
    out = tmp_path_factory.mktemp("train_one")
    cfg = TrainConfig(
        model_name=str(tiny_model_dir),
        data_path=str(d / "one.jsonl"),
        val_path=str(d / "val.jsonl"),
        out_dir=str(out),
        num_epochs=3,
        batch_size=4,  # 21 rows: the last batch has 1 row, so rank 1 gets none of it
        learning_rate=3e-3,
        r=4,
        lora_alpha=8.0,
        plot=False,
        prefix_reuse=False,  # the plain padded forward: the FSDP run packs, for a cross-check
    )
    _, metrics = train_command.run_train(cfg, echo=False)
    assert metrics[-1]["val_kl"] < metrics[0]["val_kl"]  # it trained
    return cfg, metrics, out


def assert_same_run(two: Path, one: Path, ref_metrics: list[dict]) -> None:
    metrics = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    # KL values of ~5e-4 are float32 differences of O(1) terms: batches padded to other
    # widths shift them by ~1e-4 relative; the adapters below are compared more tightly
    for m, r in zip(metrics, ref_metrics):
        assert m["val_kl"] == pytest.approx(r["val_kl"], rel=1e-3)
        if r["train_kl"] is not None:
            assert m["train_kl"] == pytest.approx(r["train_kl"], rel=1e-3)
            assert m["train_kl_seq"] == pytest.approx(r["train_kl_seq"], rel=1e-3)
    for name in ("adapter_model.safetensors", "checkpoint/adapter_model.safetensors"):
        a, b = load_file(str(two / name)), load_file(str(one / name))
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
        # and training moved the weights by much more than that tolerance
        assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3


@pytest.mark.slow
def test_training_on_two_processes_matches_one_process(one_process_training, tmp_path):
    cfg, ref_metrics, one = one_process_training
    two = tmp_path / "two"
    torchrun("train_loop.py", *flags(TrainConfig(**{**vars(cfg), "out_dir": str(two)})))
    assert_same_run(two, one, ref_metrics)
    log = (two / "train_loop.log").read_text()
    assert "data parallel on 2 processes" in log
    assert [log.count(f"epoch {e}:") for e in (1, 2, 3)] == [1, 1, 1]  # rank 0 alone writes


@pytest.mark.slow
def test_two_processes_resume_a_checkpoint(one_process_training, tmp_path):
    """Epoch 1 in one process, killed; epochs 2-3 resumed by two: the same run."""
    cfg, ref_metrics, one = one_process_training
    out = tmp_path / "resumed"
    train_command.run_train(
        TrainConfig(**{**vars(cfg), "out_dir": str(out), "num_epochs": 1}), echo=False
    )
    (out / "adapter_model.safetensors").unlink()  # what the resumed run writes is checked
    resumed = TrainConfig(**{**vars(cfg), "out_dir": str(out), "resume": True})
    torchrun("train_loop.py", *flags(resumed))
    assert_same_run(out, one, ref_metrics)
    assert "resumed from" in (out / "train_loop.log").read_text()


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process(one_process_training, tmp_path):
    """--fsdp true: the layers sharded over 2 processes (FSDP2 on gloo), the same run;
    with --prefix_reuse too (one packed pass per batch), against a plain 1-process run."""
    cfg, ref_metrics, one = one_process_training
    two = tmp_path / "fsdp"
    fsdp = TrainConfig(**{**vars(cfg), "out_dir": str(two), "fsdp": True, "prefix_reuse": True})
    torchrun("train_loop.py", *flags(fsdp))
    assert_same_run(two, one, ref_metrics)
    log = (two / "train_loop.log").read_text()
    assert "data parallel on 2 processes" in log and "FSDP: each decoder layer" in log
    # the checkpoint holds whole tensors in the same layout as a one-process run's
    a, b = checkpoint.load_checkpoint(two), checkpoint.load_checkpoint(one)
    assert a["lora"].keys() == b["lora"].keys()
    for k in a["lora"]:
        assert a["lora"][k].shape == b["lora"][k].shape
        assert torch.allclose(a["lora"][k], b["lora"][k], atol=1e-5, rtol=1e-4), k
    exp_avg = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    assert [t.shape for t in exp_avg] == [
        s["exp_avg"].shape for s in b["optimizer"]["state"].values()
    ]
    # and the adapter loads with plain peft, every weight found
    from peft import PeftModel, get_peft_model_state_dict

    from promptbake.models import load_model

    base, _ = load_model(cfg.model_name, "cpu", "float32")
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, str(two)))
    saved = load_file(str(two / "adapter_model.safetensors"))
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_fsdp_resumes_an_fsdp_checkpoint(one_process_training, tmp_path):
    """Epoch 1 under --fsdp, then epochs 2-3 resumed under --fsdp: the same run."""
    cfg, ref_metrics, one = one_process_training
    out = tmp_path / "resumed"
    first = TrainConfig(**{**vars(cfg), "out_dir": str(out), "num_epochs": 1, "fsdp": True})
    torchrun("train_loop.py", *flags(first))
    (out / "adapter_model.safetensors").unlink()  # what the resumed run writes is checked
    resumed = TrainConfig(**{**vars(cfg), "out_dir": str(out), "resume": True, "fsdp": True})
    torchrun("train_loop.py", *flags(resumed))
    assert_same_run(out, one, ref_metrics)
    assert "resumed from" in (out / "train_loop.log").read_text()


# ---------------------------------------------------------------- one process, no group
def test_fsdp_is_refused_without_torchrun(tmp_path, monkeypatch):
    cfg = TrainConfig(data_path="d.jsonl", out_dir=str(tmp_path), fsdp=True)
    with pytest.raises(UserError, match=r"launch with torchrun --nproc_per_node N \(N >= 2\)"):
        cfg.validate()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets
    cfg.validate()
    TrainConfig(**{**vars(cfg), "prefix_reuse": True}).validate()


def test_idle_batch_runs_one_row_and_predicts_nothing(reference):
    d, cfg = reference
    tok = load_tokenizer(cfg.model_name)
    b = batches.collate(read_trajectories(d / "one.jsonl")[:3], tok.pad_token_id)
    idle = distributed.idle_batch(b)
    for side, full in ((idle.prompted, b.prompted), (idle.unprompted, b.unprompted)):
        assert torch.equal(side.input_ids, full.input_ids[:1])
        assert not side.pred_mask.any() and full.pred_mask[:1].any()
    assert idle.num_tokens == 0


def test_helpers_are_no_ops_in_one_process():
    assert distributed.world_size() == 1 and distributed.is_main() and not distributed.active()
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    distributed.barrier()
    distributed.init("cpu")  # no torchrun environment: stays single-process
    assert not distributed.active()


def test_shards_of_each_global_batch_are_disjoint_and_complete(monkeypatch):
    seen = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "3")
        seen.append(distributed.shard(list(range(7))))
    assert seen == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(seen, [])) == list(range(7))


def test_token_weighted_shares_give_the_global_batch_gradient(reference, monkeypatch):
    """What fit() does on each rank, summed by hand: equals one process's gradient."""
    d, cfg = reference
    from promptbake.models import load_model

    model, tok = load_model(cfg.model_name, "cpu", "float32")
    model = setup.add_lora(model, LoraArgs(r=4, lora_alpha=8.0))
    with torch.no_grad():  # a non-zero B, so every LoRA weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = read_trajectories(d / "one.jsonl")[:5]
    pad = tok.pad_token_id
    order = [4, 1, 3, 0, 2]

    def grads(world: int) -> list[torch.Tensor]:
        model.zero_grad()
        shares = []
        for r in range(world):
            monkeypatch.setenv("RANK", str(r))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            shares.append(batches.make_batches(rows, 4, pad, None, order, shard=world > 1))
        n_glob = [sum(s[i].num_tokens for s in shares if s[i] is not None) for i in range(2)]
        for s in shares:
            b = s[0]  # the first global batch; rank 1's share of the 1-row second one is None
            kl, _ = objective.batch_kl(model, b)
            (kl.sum() / n_glob[0]).backward()  # the sum over ranks = all_reduce_grads
        assert [s[1] is None for s in shares] == [False] + [True] * (world - 1)
        return [p.grad.clone() for p in params]

    one, two = grads(1), grads(2)
    assert max(float(g.abs().max()) for g in one) > 1e-6
    for a, b in zip(one, two):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)
