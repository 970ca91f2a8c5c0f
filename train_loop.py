"""Bake trajectories into a LoRA adapter (the original script's interface).

    python train_loop.py --model_name smollm2-135m --data_path data/qwen3_test.jsonl \
        --val_path data/qwen3_test_val.jsonl --out_dir results/qwen3_test --num_epochs 2 \
        --batch_size 2 -r 8

Same as `promptbake train`; run with --help for every flag.
"""

import sys
from pathlib import Path

try:
    import promptbake  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from promptbake.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="train_loop.py", only="train"))
