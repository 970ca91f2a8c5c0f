"""promptbake: Prompt Baking (Bhargava et al. 2024, arXiv 2409.13697).

A prompt u is baked into LoRA weights so that the model *without* u behaves like the
model *with* u. The house, from the ground up (a module imports only what is below it):

ground      errors.py       UserError (one line, exit 2), warnings, Ctrl-C and SIGTERM
            files.py        every file written: atomic files and folders, modes, full disks, plots
            guards.py       where a run may write: never an input, marked run folders, locks
            models.py       load a model + tokenizer: hub id, local dir, .gguf, bundled alias
            prompts.py      render (prompt, question) through the model's chat template
            records.py      the user's inputs: prompt files, question sets, JSON read back
            schema.py       the trajectory schema: rows, reading trajectory files, their checks
            loss.py         the divergences (forward KL, reverse KL, JSD), chunked and fused
            distributed.py  torchrun data parallelism and FSDP
            configs/        every command's config: flags, defaults, --help, validation
            adapters.py     a baked adapter: find its base, load, scale, save
stages      sampling/       the sampling seam, its engines, the generation stage
            training/       batches, forward, objective, teacher targets, the loop
            evaluation/     conditions, answers, NLL/KL, scorers, reports, compare, eval
commands    generate.py  train.py  bake.py  pursue.py  chat.py  merge.py  data.py
            (compare and eval live in evaluation/); flags.py turns configs into flags,
            cli.py is the `promptbake` command; generate_data.py and train_loop.py at the
            repository root are the seed's scripts.
"""

__version__ = "0.1.0"
