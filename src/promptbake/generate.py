"""`promptbake generate` / ``generate_data.py``: sample trajectories from the prompted model.

    python generate_data.py --model_name smollm2-135m --x0_file data/zorblax_x0.md \\
        --question_dataset data/questions.jsonl --num_questions 20 \\
        --num_sequences_per_question 4 --traj_out_file data/zorblax.jsonl

:func:`run_generate` reads and checks the inputs, takes the output's one-writer lock,
loads the model and runs the generation stage (sampling.trajectories). While sampling,
the prompted model's full next-token distribution at every generated token is the
teacher that training distils: within --save_teacher_cache's budget (training.targets)
it is kept and written next to the trajectories, ``<traj_out_file>.teacher.safetensors``
(training.sidecar), so that train_loop.py skips its own teacher pass.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import distributed
from .configs import GenerateConfig
from .errors import UserError
from .guards import check_not_inputs, check_writable, exclusive_lock
from .models import load_model, model_options, peak_gpu_memory
from .records import read_prompt, read_questions, select_questions
from .sampling.seam import returns
from .sampling.trajectories import Generation, generate_trajectories, side_files
from .training.sidecar import model_identity, quantization, save_sidecar
from .training.targets import sidecar_keep
from .training.teacher import cache_bytes, cache_from_generation


def write_teacher_sidecar(cfg: GenerateConfig, model, out: Path, gen: Generation) -> None:
    """<out>.teacher.safetensors from the kept log-probs (training.sidecar), or one line
    saying why there is none (train_loop.py then runs the teacher itself)."""
    if cfg.save_teacher_cache == "never":
        return
    cache = None if gen.kept is None else cache_from_generation(gen.rows, gen.kept)
    if cache is None:
        vocab = model.get_output_embeddings().weight.shape[0]
        n = sum(sum(r["generated_text_mask"]) for r in gen.rows)
        print(
            f"Teacher log-probs not saved ({cache_bytes(n, vocab, 'exact', 0) / 1e9:.2f} GB "
            f"table; --save_teacher_cache {cfg.save_teacher_cache}, max "
            f"{cfg.save_teacher_cache_max_gb:g} GB; a resumed or multi-process run, or an "
            "engine without full log-probs, keeps none)"
        )
        return
    ident = model_identity(cfg.model_name, model, quantization(cfg))
    path = save_sidecar(out, cache, gen.rows, ident)
    print(f"Teacher log-probs saved to {path} ({cache.nbytes / 1e9:.2f} GB)")


def run_generate(cfg: GenerateConfig, model=None, tokenizer=None) -> dict:
    """The whole stage from a config: read inputs, load the model (unless given), write."""
    cfg.validate()
    distributed.init(cfg.device)  # before loading: each process takes its own GPU
    x0 = read_prompt(cfg.x0_file)
    questions = select_questions(
        read_questions(cfg.question_dataset), cfg.num_questions, cfg.seed, cfg.shuffle
    )
    out = Path(cfg.traj_out_file)
    if out.is_dir():
        raise UserError(f"--traj_out_file {out} is a directory; give a .jsonl file path")
    check_writable(out, "--traj_out_file")  # before the model loads
    # no output, the file or one written beside it, is an input (guards.check_not_inputs)
    check_not_inputs(
        [("--traj_out_file", p, None) for p in (out, *side_files(out))],
        [
            ("--x0_file", cfg.x0_file),
            ("--question_dataset", cfg.question_dataset),
            ("--model_name", cfg.model_name),  # a local model folder or .gguf (a hub id is none)
        ],
    )
    # one writer per output for the whole run: a second run at once is refused (exit 2)
    main = distributed.is_main()
    with exclusive_lock(out, "--traj_out_file") if main else contextlib.nullcontext():
        if model is None:
            model, tokenizer = load_model(
                cfg.model_name, cfg.device, cfg.dtype, cfg.trust_remote_code, **model_options(cfg)
            )
        sampler = returns(cfg.engine, model.device)
        keep = sidecar_keep(cfg.save_teacher_cache, cfg.save_teacher_cache_max_gb, sampler)
        gen = generate_trajectories(model, tokenizer, cfg, x0, questions, out, keep_bytes=keep)
        if main:  # still holding the lock: the sidecar is this run's output too
            write_teacher_sidecar(cfg, model, out, gen)
    stats = gen.stats
    if not main:
        return stats
    print(
        f"Generated {stats['trajectories']} trajectories, {stats['new_tokens']} new tokens in "
        f"{stats['seconds']:.1f} s ({stats['traj_per_s']:.2f} traj/s, "
        f"{stats['tokens_per_s']:.1f} tok/s)"
    )
    print(f"Dataset saved to {out}")
    peak = peak_gpu_memory(model)
    if peak is not None:
        print(peak[0].upper() + peak[1:])
    return stats
