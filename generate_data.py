"""Sample trajectories from the prompted model (the original script's interface).

    python generate_data.py --model_name smollm2-135m --x0_file data/truth_x0.md \
        --question_dataset data/questions.jsonl --num_questions 5 \
        --num_sequences_per_question 2 --batch_size 2 --traj_out_file data/qwen3_test.jsonl

Same as `promptbake generate`; run with --help for every flag.
"""

import sys
from pathlib import Path

try:
    import promptbake  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from promptbake.cli import main  # noqa: E402
from promptbake.prompts import format_prompt  # noqa: E402,F401  (the seed imports it from here)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="generate_data.py", only="generate"))
