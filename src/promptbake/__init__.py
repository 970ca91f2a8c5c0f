"""promptbake: Prompt Baking (Bhargava et al. 2024, arXiv 2409.13697).

A prompt u is baked into LoRA weights so that the model *without* u behaves like
the model *with* u. The pipeline, one module per stage:

    models.py    load a model + tokenizer (hub id, local dir, .gguf, bundled alias)
    chat.py      render (system, user) into the model's chat template
    data.py      question sets, the trajectory schema, atomic JSONL writing
    generate.py  sample trajectories from the prompted model
    loss.py      the divergences (pure functions)
    train.py     LoRA training loop: setup -> fit -> validate
    evaluate.py  held-out KL, side-by-side answers
    bake.py      generate + train in one process (one model load)
    cli.py       the `promptbake` command
"""

__version__ = "0.1.0"
