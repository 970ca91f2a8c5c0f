"""The is-it-baked tools' configs: compare, eval, chat, merge, and the data fetcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .choices import DATASET_NAMES, ENGINE_NAMES, MODES, SCORER_SPECS
from .fields import check_int_ranges, check_temperature, opt, require, require_finite
from .stages import ModelArgs


# ---------------------------------------------------------------- compare, eval, chat
@dataclass
class CompareConfig(ModelArgs):
    adapter: str | None = opt(None, "adapter directory (a bake/train --out_dir or its epoch_N/)")
    data_file: str | None = opt(
        None, "trajectory JSONL to score; default: the run's validation trajectories"
    )
    prompt_override: str | None = opt(
        None, "file with another system prompt to score the 'with prompt' conditions under"
    )
    out_dir: str | None = opt(None, "where to write the table and plots; default <adapter>/compare")
    path_prefix: str = opt("", "prefix for the output file names, e.g. pirate_")
    batch_size: int = opt(8, "trajectories per forward pass")
    adapter_scale: float = opt(1.0, "LoRA scale: 0 base, 1 baked, >1 amplified")
    kl_chunk_size: int = opt(1024, "token rows per LM-head chunk (bounds memory)")
    plot: bool = opt(True, "write the scatter plots")
    model_name: str | None = opt(
        None, "base model; default: the one recorded with the adapter (adapter_config/args.json)"
    )

    def validate(self) -> None:
        require(self.adapter is not None, "--adapter is required (the adapter directory)")
        require(self.batch_size > 0, "--batch_size must be positive")
        require(self.kl_chunk_size > 0, "--kl_chunk_size must be positive")
        require_finite(self, "adapter_scale")
        require(
            "/" not in self.path_prefix and "\\" not in self.path_prefix,
            "--path_prefix is a file-name prefix; it cannot contain a path separator",
        )


@dataclass
class EvalConfig(ModelArgs):
    adapter: str | None = opt(
        None, "adapter directory; without it only the base and prompted modes run"
    )
    questions: str | None = opt(None, "JSONL question set(s) to answer; comma-separated")
    scorer: str | None = opt(None, f"scorer spec(s), comma-separated: {SCORER_SPECS}")
    x0_file: str | None = opt(None, "file with the prompt; default: the adapter run's prompt")
    prompt: str | None = opt(None, "the prompt as text (instead of --x0_file)")
    modes: str | None = opt(
        None, "comma-separated modes; default base,prompted,baked,re-prompted (no adapter: 2)"
    )
    adapter_scale: str = opt("1", "LoRA scale(s) for the adapter modes, comma-separated")
    num_questions: int | None = opt(None, "answer only the first N questions")
    max_new_tokens: int = opt(64, "new tokens per answer")
    temperature: float = opt(0.0, "0: greedy; > 0: sample at this temperature")
    num_samples: int = opt(1, "answers per question (only with --temperature > 0)")
    batch_size: int = opt(16, "questions answered at once")
    enable_thinking: bool | None = opt(None, "Qwen3 thinking switch for the chat template")
    engine: str = opt(
        "auto",
        "sampling engine for the answers: hf, static (CUDA), vllm, or auto (see generate --help)",
        choices=list(ENGINE_NAMES),
    )
    out_dir: str | None = opt(None, "where eval.json and eval.md go; default <adapter>/eval")
    model_name: str | None = opt(
        None, "base model; default: the one recorded with the adapter (adapter_config/args.json)"
    )

    def validate(self) -> None:
        require(self.questions is not None, "--questions is required (a JSONL question set)")
        require(bool(self.scorer), f"--scorer is required; one or more of: {SCORER_SPECS}")
        require(
            self.adapter is not None or self.model_name is not None,
            "give --adapter (a baked run) or --model_name (base and prompted modes only)",
        )
        require(not (self.x0_file and self.prompt), "give at most one of --x0_file, --prompt")
        require(self.max_new_tokens > 0, "--max_new_tokens must be positive")
        require(self.batch_size > 0, "--batch_size must be positive")
        require_finite(self, "temperature")
        require(self.temperature >= 0, "--temperature must be >= 0")
        check_temperature(self.temperature, greedy_zero=True)
        require(self.num_samples > 0, "--num_samples must be positive")
        require(
            self.num_samples == 1 or self.temperature > 0,
            "--num_samples > 1 needs --temperature > 0 (greedy answers are all the same)",
        )
        require(self.num_questions is None or self.num_questions > 0, "--num_questions must be > 0")


@dataclass
class ChatConfig(ModelArgs):
    adapter: str | None = opt(None, "adapter directory; without it only base and prompted work")
    x0_file: str | None = opt(None, "file with the prompt; default: the adapter run's prompt")
    prompt: str | None = opt(None, "the prompt as text (instead of --x0_file)")
    mode: str | None = opt(
        None, "starting mode; default baked (base without --adapter)", choices=list(MODES)
    )
    adapter_scale: float = opt(1.0, "LoRA scale: 0 base, 1 baked, >1 amplified")
    max_new_tokens: int = opt(128, "new tokens per answer")
    temperature: float = opt(0.0, "0: greedy; > 0: sample at this temperature")
    enable_thinking: bool | None = opt(None, "Qwen3 thinking switch for the chat template")
    engine: str = opt(
        "auto",
        "sampling engine for the answers: hf, static (CUDA), vllm, or auto (see generate --help)",
        choices=list(ENGINE_NAMES),
    )
    model_name: str | None = opt(
        None, "base model; default: the one recorded with the adapter (adapter_config/args.json)"
    )

    def validate(self) -> None:
        require(
            self.adapter is not None or self.model_name is not None,
            "give --adapter (a baked run) or --model_name",
        )
        require(not (self.x0_file and self.prompt), "give at most one of --x0_file, --prompt")
        require(self.max_new_tokens > 0, "--max_new_tokens must be positive")
        require_finite(self, "temperature", "adapter_scale")
        require(self.temperature >= 0, "--temperature must be >= 0")
        check_temperature(self.temperature, greedy_zero=True)


# ---------------------------------------------------------------- merge
@dataclass
class MergeConfig(ModelArgs):
    adapter: str | None = opt(None, "adapter directory (a bake/train --out_dir or its epoch_N/)")
    out: str | None = opt(None, "directory for the merged model (weights + tokenizer)")
    adapter_scale: float = opt(1.0, "merge the LoRA update at this scale (0 base, 1 baked)")
    model_name: str | None = opt(
        None, "base model; default: the one recorded with the adapter (adapter_config/args.json)"
    )

    def validate(self) -> None:
        require(self.adapter is not None, "--adapter is required (the adapter directory)")
        require(self.out is not None, "--out is required (where the merged model goes)")
        require_finite(self, "adapter_scale")
        require(
            not (self.load_in_8bit or self.load_in_4bit),
            "merge writes full-precision weights: drop --load_in_8bit/--load_in_4bit (merging "
            "into quantized weights would round the update away)",
        )


# ---------------------------------------------------------------- data
@dataclass
class DataConfig:
    SET_BY_COMMAND: ClassVar[tuple[str, ...]] = ()

    name: str | None = opt(
        None, "public question set to fetch", choices=list(DATASET_NAMES), positional=True
    )
    out_dir: str = opt("data", "where to write <name>_{train,validation}.jsonl")
    max_rows: int | None = opt(None, "keep at most this many rows per split")

    def validate(self) -> None:
        require(self.name is not None, f"name the question set: one of {', '.join(DATASET_NAMES)}")
        require(self.max_rows is None or self.max_rows > 0, "--max_rows must be positive")
        check_int_ranges(self)
