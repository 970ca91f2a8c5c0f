"""Sampling: every answer promptbake draws from a model goes through one seam.

    seam.py          Sampling, Samples, sample(model, prompts, settings, ...): the seam;
                     the engines by name (--engine), what each hands back (returns)
    hf.py            engine: transformers' generate (any model, any device)
    static.py        engine: a static KV cache with a compiled decode step (CUDA)
    trajectories.py  the generation stage: plan, resume, shard and write trajectories

The commands that sample: generate.py (generate_data.py), bake.py, pursue.py,
chat.py, the evaluation package, and on-policy training (training/onpolicy.py).
"""
