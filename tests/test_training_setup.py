"""Run setup (promptbake.training.setup): attaching the LoRA adapter.

python -m pytest tests/test_training_setup.py -q
"""

import pytest

from promptbake.configs import LoraArgs
from promptbake.training.setup import add_lora


def test_unknown_target_module_lists_the_linear_modules(tiny_model):
    from promptbake.errors import UserError

    with pytest.raises(UserError) as e:
        add_lora(tiny_model, LoraArgs(target_modules="q_proj,query_key_value"))
    msg = str(e.value)
    assert "query_key_value" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
