"""Correctness guard for the speed-ups the benchmark measures (bench/).

    python -m pytest tests/test_bench_guard.py -q

The optimized loss (LM head only at generated positions, chunked KL, prefix reuse, exact
teacher cache) must equal the original's full-logit KL on tiny shapes within 1e-5, and
the benchmark harness must run end to end (tiny model) and skip its GPU job cleanly
when there is no GPU.
"""

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`

from bench import cpu as bench_cpu  # noqa: E402
from bench import gpu_measure as bench_gpu  # noqa: E402
from bench import jobs as bench_jobs  # noqa: E402
from bench import tables as bench_tables  # noqa: E402
from bench.original import (  # noqa: E402
    OriginalSampling,
    OriginalTraining,
    add_lora_original,
    generate_original,
    step_kl,
)
from promptbake.prompts import encode, format_prompt  # noqa: E402
from promptbake.schema import make_trajectory  # noqa: E402
from promptbake.training.batches import collate  # noqa: E402
from promptbake.training.forward import base_of, selected_hidden  # noqa: E402
from promptbake.training.objective import batch_kl  # noqa: E402
from promptbake.training.teacher import build_teacher_cache  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rows_for(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in ["Who are you?", "Name a colour.", "What is the capital of a country?"]:
        p = encode(tok, format_prompt("Your name is Zorblax.", q, True, tok))
        p0 = encode(tok, format_prompt("Your name is Zorblax.", q, False, tok))
        for _ in range(2):
            n = int(torch.randint(1, 8, (1,), generator=g))
            rows.append(
                make_trajectory(tok, p, p0, torch.randint(10, 1200, (n,), generator=g).tolist())
            )
    return rows


@pytest.fixture
def peft_model(tiny_model):
    m = add_lora_original(copy.deepcopy(tiny_model), 4, 8.0, "q_proj,k_proj,v_proj,o_proj", 0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def grads(m):
    return torch.cat([p.grad.flatten() for n, p in m.named_parameters() if "lora_" in n])


def test_logits_at_generated_positions_equal_a_plain_forward(tiny_model, chatml_tok):
    b = collate(rows_for(chatml_tok), chatml_tok.pad_token_id)
    for side in (b.prompted, b.unprompted):
        with torch.no_grad():
            full = tiny_model(input_ids=side.input_ids, attention_mask=side.attention_mask).logits
            ours = base_of(tiny_model).get_output_embeddings()(selected_hidden(tiny_model, side))
        torch.testing.assert_close(ours, full[side.pred_mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["chunked", "prefix_reuse", "cache_exact"])
def test_optimized_loss_equals_the_naive_full_logit_kl(peft_model, chatml_tok, variant):
    rows = rows_for(chatml_tok)
    pad = chatml_tok.pad_token_id
    naive = step_kl(peft_model, rows, pad)  # full [B, T, V] logits, both models
    naive.sum().backward()
    g_naive = grads(peft_model)
    peft_model.zero_grad()
    kw = {}
    if variant == "prefix_reuse":
        kw["prefix_reuse"] = True
    if variant == "cache_exact":
        cache = build_teacher_cache(peft_model, rows, pad, batch_size=4, log=lambda s: None)
        kw["teacher"] = cache.target(range(len(rows)))
    ours, _ = batch_kl(peft_model, collate(rows, pad), 4, **kw)  # chunks of 4 rows
    ours.sum().backward()
    assert naive.shape == ours.shape and naive.min() > 0
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads(peft_model), g_naive, atol=1e-6, rtol=1e-4)


def test_original_generation_is_one_question_per_batch(tiny_model, chatml_tok):
    qs = [{"question": "Who are you?"}, {"question": "Name a colour."}]
    s = OriginalSampling(n_seq=3, max_new_tokens=5, seed=1)
    rows, stats = generate_original(tiny_model, chatml_tok, "Be brief.", qs, s)
    assert len(rows) == 6 and stats["new_tokens"] == sum(
        sum(r["generated_text_mask"]) for r in rows
    )
    assert [r["question"] for r in rows] == ["Who are you?"] * 3 + ["Name a colour."] * 3
    assert all(1 <= sum(r["generated_text_mask"]) <= 5 for r in rows)


def test_gpu_job_skips_with_a_message_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the job would run")
    res = bench_gpu.run_gpu(bench_jobs.GpuJob())
    assert "no CUDA device" in res["skipped"]
    assert "GPU job: skipped" in bench_tables.table({"machine": "m", "gpu": res})


def test_harness_runs_end_to_end_on_a_tiny_model(tmp_path):
    job = dataclasses.replace(bench_jobs.QUICK, variants=["plain", "+cache_exact", "ours"])
    res = bench_cpu.run_cpu(job, tmp_path)
    t = res["training"]
    assert set(t) == {"original", "plain", "+cache_exact", "ours"}
    # the same maths and the same batches: the original and plain train identically
    assert t["plain"]["heldout_kl"] == pytest.approx(t["original"]["heldout_kl"], rel=1e-4)
    assert t["+cache_exact"]["heldout_kl"] == pytest.approx(t["plain"]["heldout_kl"], rel=1e-4)
    assert t["ours"]["heldout_kl"] < res["heldout_kl_base"]  # training helped
    # every pipeline trains on every generated token of the same rows, every epoch
    g, e = res["generation"], res["end_to_end"]["seconds"]
    assert (
        t["plain"]["kl_tokens"]
        == t["original"]["kl_tokens"]
        == job.epochs * g["ours"]["new_tokens"]
    )
    # each ratio is ours over the original's measured rate (end to end: its time over ours),
    # and our end to end is one load, the generation and the training that were timed
    r = res["ratios"]
    ratio_of = lambda a, b: pytest.approx(a / b, abs=1e-3)  # noqa: E731  (rounded to 3 places)
    assert r["generated_tokens_per_s"] == ratio_of(
        g["ours"]["tokens_per_s"], g["original"]["tokens_per_s"]
    )
    assert r["training_tokens_per_s"] == ratio_of(
        t["ours"]["tokens_per_s"], t["original"]["tokens_per_s"]
    )
    assert r["end_to_end_speedup"] == ratio_of(e["original"], e["ours"])
    assert e["ours"] == pytest.approx(
        res["load"]["ours"]["seconds"] + g["ours"]["seconds"] + t["ours"]["seconds"]
    )
    text = bench_tables.table({"machine": "tiny", "cpu": res})
    assert "| end-to-end bake (s) |" in text and "| ours |" in text


def test_gpu_job_code_path_runs_on_a_tiny_model(tiny_model, chatml_tok):
    """The GPU job's own code (ours vs the original's subset, ratios, table) on the CPU."""
    chatml_tok.padding_side = "left"
    job = bench_jobs.GpuJob(
        n_train_q=3,
        n_seq=2,
        max_new_tokens=5,
        min_new_tokens=2,
        gen_batch_size=4,
        batch_size=2,
        original_questions=1,
        original_train_steps=2,
    )
    res = bench_gpu.run_gpu(job, tiny_model, chatml_tok, torch.device("cpu"))
    assert res["generation_ours"]["new_tokens"] >= 3 * 2 * 2  # min_new_tokens honoured
    ours, orig = res["generation_ours"], res["generation_original_subset"]
    train_ours, train_orig = res["train_ours"], res["train_original_subset"]
    # ours end to end is the generation and the epoch that were timed; the original's is
    # estimated at its measured rates for as many tokens as ours generated
    assert res["end_to_end_ours_s"] == pytest.approx(ours["seconds"] + train_ours["seconds"])
    n = ours["new_tokens"]
    assert res["end_to_end_original_estimate_s"] == pytest.approx(
        n / orig["tokens_per_s"] + n / train_orig["tokens_per_s"]
    )
    ratio_of = lambda a, b: pytest.approx(a / b, abs=1e-3)  # noqa: E731  (rounded to 3 places)
    assert res["ratios"] == {
        "generated_tokens_per_s": ratio_of(ours["tokens_per_s"], orig["tokens_per_s"]),
        "training_tokens_per_s": ratio_of(train_ours["tokens_per_s"], train_orig["tokens_per_s"]),
        "end_to_end_speedup": ratio_of(
            res["end_to_end_original_estimate_s"], res["end_to_end_ours_s"]
        ),
    }
    assert "GPU job (random Qwen3-1.7B" in bench_tables.table({"machine": "m", "gpu": res})


def test_bench_gpu_rates_run_on_a_tiny_model(tiny_model, chatml_tok, tmp_path):
    """`make bench-gpu`'s (b) and (c) (bench/gpu_measure.py) on the CPU: the code the
    card runs, less the CUDA calls."""
    from promptbake.files import write_jsonl

    chatml_tok.padding_side = "left"
    gen = bench_gpu.generation(tiny_model, chatml_tok, 3, 4, bandwidth=1e9)
    assert gen["batch"] == 3 and gen["new_tokens"] == 3 * 4  # every row decodes all 4
    assert 0 < gen["roofline_fraction"] and gen["engine"]
    traj = tmp_path / "traj.jsonl"
    write_jsonl(traj, [r for seed in range(4) for r in rows_for(chatml_tok, seed)])  # 24 rows
    tr = bench_gpu.training(tiny_model, chatml_tok, traj, tmp_path, 2, peak_flops=1e12)
    assert tr["ours_tokens_per_s"] > 0 and tr["original_tokens_per_s"] > 0
    assert tr["ratio"] == pytest.approx(tr["ours_tokens_per_s"] / tr["original_tokens_per_s"])


def test_one_mapping_from_a_job_to_its_configs(tmp_path):
    """Ours and the original get a job's settings through the same configs."""
    job = bench_jobs.Job()
    g = bench_jobs.job_generate_config(job, tmp_path / "t.jsonl")
    assert (g.model_name, g.question_dataset, g.num_questions) == (
        job.model,
        job.train_questions,
        job.n_train_q,
    )
    h = bench_jobs.job_generate_config(job, tmp_path / "h.jsonl", heldout=True)
    assert (h.question_dataset, h.num_questions) == (job.heldout_questions, job.n_val_q)
    assert OriginalSampling.of(g) == OriginalSampling(
        n_seq=job.n_seq,
        max_new_tokens=job.max_new_tokens,
        min_new_tokens=job.min_new_tokens,
        temperature=job.temperature,
        batch_size=job.gen_batch_size,
        seed=job.seed,
    )
    t = bench_jobs.job_train_config(job, "d.jsonl", "out", prefix_reuse=False)
    assert (t.num_epochs, t.batch_size, t.learning_rate, t.r, t.lora_alpha) == (
        job.epochs,
        job.batch_size,
        job.learning_rate,
        job.r,
        job.lora_alpha,
    )
    assert t.prefix_reuse is False and t.kl_chunk_size == job.kl_chunk_size
    assert OriginalTraining.of(t) == OriginalTraining(
        epochs=job.epochs,
        batch_size=job.batch_size,
        learning_rate=job.learning_rate,
        r=job.r,
        lora_alpha=job.lora_alpha,
        seed=job.seed,
    )
    gpu = bench_jobs.job_train_config(bench_jobs.GpuJob(), "d.jsonl", "out")
    assert (gpu.kl_chunk_size, gpu.r, gpu.lora_alpha, gpu.learning_rate) == (0, 32, 1.0, 1e-4)


def test_static_cache_and_generation_oom_backoff(chatml_tok, monkeypatch, capsys):
    """Decoding with a static cache (prompts padded to 64) gives the dynamic cache's greedy
    answers, and a CUDA out-of-memory splits the batch instead of crashing."""
    import tiny

    from promptbake.sampling.hf import sample_batch

    model = tiny.tiny_qwen3(chatml_tok, initializer_range=0.2)
    prompts = [encode(chatml_tok, format_prompt(None, q, False, chatml_tok)) for q in "abc"]
    kw = dict(pad_id=chatml_tok.pad_token_id, eot_ids=[1], max_new_tokens=6, do_sample=False)
    plain = sample_batch(model, prompts, **kw)
    assert len(set(map(tuple, plain))) > 1  # not a degenerate model
    static = sample_batch(model, prompts, cache_implementation="static", **kw)
    assert static == plain
    real = model.generate

    def flaky(*a, **k):
        if k["input_ids"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("fake")
        return real(*a, **k)

    monkeypatch.setattr(model, "generate", flaky)
    assert sample_batch(model, prompts, **kw) == plain
    assert "CUDA out of memory at 3 sequences" in capsys.readouterr().err


def test_seed_job_times_the_commands_users_type():
    """The seed job's processes: ours are the seed's scripts with the shared sizes; the
    original gets the same flags; each pipeline writes into its own directory."""
    from bench import seed as bench_seed

    job = bench_jobs.Job()
    d = Path("D")
    ours = dict(bench_seed.commands("ours", job, "smollm2-135m", d))
    orig = dict(bench_seed.commands("original", job, "smollm2-135m", d))
    assert ours["generate"][1] == "generate_data.py" and ours["train"][1] == "train_loop.py"
    assert orig["generate"][1:4] == ["-m", "bench.original", "generate"]
    train = ours["train"]
    flags = dict(zip(train[2::2], train[3::2]))
    assert flags == {
        "--model_name": "smollm2-135m",
        "--data_path": str(d / "traj.jsonl"),
        "--out_dir": str(d / "adapter"),
        "--num_epochs": "3",
        "--batch_size": "8",
        "-r": "8",
        "--lora_alpha": "16.0",
        "--learning_rate": "0.001",
    }  # nothing else: train_loop.py's own defaults (teacher cache, prefix reuse) apply
    assert orig["train"][4:-2] == train[2:]  # the same flags, then --stats
    assert orig["generate"][4:-2] == ours["generate"][2:]


@pytest.mark.slow
def test_seed_job_runs_both_pipelines_as_processes(tmp_path):
    """bench.run --config seed --quick, one run each: four processes, one evaluator."""
    from bench import seed as bench_seed

    res = bench_seed.run_seed(bench_jobs.QUICK, tmp_path, repeats=1)
    kl = res["heldout_kl"]
    assert len(kl["ours"]) == len(kl["original"]) == 1
    # both bakes moved the model towards the prompted one, by similar amounts
    assert kl["ours"][0] < kl["base"] and kl["original"][0] < kl["base"]
    assert kl["ours"][0] == pytest.approx(kl["original"][0], rel=0.2)
    run = res["runs"]["ours"][0]
    assert run["end_to_end"]["seconds"] == pytest.approx(
        run["generate"]["seconds"] + run["train"]["seconds"]
    )
    assert res["runs"]["original"][0]["inner"]["train"]["work_seconds"] > 0
    text = bench_tables.table({"machine": "tiny", "seed": res})
    assert "| end to end |" in text and "Seed job" in text
