"""A training run's outputs (promptbake.training.outputs): --report_to tensorboard.

python -m pytest tests/test_training_outputs.py -q
"""

from __future__ import annotations

import copy
import sys

import pytest
from tiny import loop_config, loop_rows

from promptbake.errors import UserError
from promptbake.training import loop as train


def test_tensorboard_logs_step_loss_lr_and_epoch_kl(tiny_model, chatml_tok, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = loop_rows(chatml_tok)
    cfg = loop_config(tmp_path, "tb", batch_size=8, report_to="tensorboard")  # one step per epoch
    _, metrics = train.train(cfg, copy.deepcopy(tiny_model), chatml_tok, rows, rows, echo=False)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()

    def series(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    loss = series("train/loss")
    assert sorted(loss) == [1, 2, 3]
    for m in metrics[1:]:
        assert loss[m["epoch"]] == pytest.approx(m["train_kl"], rel=1e-5)
    assert series("train/learning_rate") == {s: pytest.approx(1e-2) for s in (1, 2, 3)}
    assert all(v > 0 for v in series("train/tokens_per_s").values())
    val = series("epoch/val_kl")
    assert val == {m["epoch"]: pytest.approx(m["val_kl"], rel=1e-5) for m in metrics}


def test_tensorboard_missing_is_one_clear_error(monkeypatch):
    from promptbake.training.outputs import check_report_to

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"--report_to tensorboard needs the tensorboard package"):
        check_report_to("tensorboard")
    check_report_to("none")
