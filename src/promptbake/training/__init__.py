"""Training: a LoRA on the unprompted model, distilled from the prompted one.

Read in this order (each imports only the ones above it, and the ground modules):

    batches.py     collation, length bucketing, row slicing, packing plans (host-built)
    forward.py     adapter on/off, hidden states at the KL rows, the packed prefix-tree forward
    objective.py   a batch's divergence, its backward in row slices, held-out KL
    teacher.py     the teacher's log-prob table: built by a teacher pass, or from generation's
    sidecar.py     that table handed from generate_data.py to train_loop.py in a file
    targets.py     THE decision where the teacher's targets come from (one plan per run)
    onpolicy.py    on-policy batches: the student's own answers, scored by the teacher
    outputs.py     the run's log, adapter files, KL plot, TensorBoard
    checkpoint.py  the training state on disk: resume after a kill
    setup.py       a run's state (Run) and its setup: LoRA, optimizer, resume
    loop.py        train(): fit an epoch, validate, keep the best, checkpoint

The train command (train.py, train_loop.py) reads the inputs and calls loop.train.
"""
