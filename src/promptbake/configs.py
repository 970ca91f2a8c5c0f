"""Stage configs: one dataclass per stage is the single source of truth for defaults,
``--help`` text and validation, for the seed scripts and the ``promptbake`` CLI alike.

    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerateConfig)
    cfg = from_namespace(GenerateConfig, parser.parse_args())
    cfg.validate()
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .distributed import world_size
from .errors import UserError
from .models import ATTN_IMPLEMENTATIONS, DEFAULT_MODEL, check_model_options
from .sampling import engine_names


def opt(default: Any, help: str, *aliases: str, choices: list | None = None) -> Any:
    """A dataclass field carrying its CLI help, extra flag spellings and choices."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices})


def parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base_type(tp: Any) -> Any:
    """int | None -> int, etc."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    shared = {f.name for f in dataclasses.fields(ModelArgs)}
    # the stage's own flags first, the shared model flags last: what --help shows first
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):
        tp = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"default": f.default, "dest": f.name}
        help_ = f.metadata.get("help", "")
        if tp is bool:
            kwargs.update(type=parse_bool, metavar="{true,false}")
        else:
            kwargs["type"] = tp
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.default is not None and f.default != "":
            help_ += f" (default: {f.default})"
        flags = [f"--{f.name}", *f.metadata.get("aliases", ())]
        parser.add_argument(*flags, help=help_, **kwargs)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ---------------------------------------------------------------- shared by all stages
@dataclass
class ModelArgs:
    model_name: str = opt(
        DEFAULT_MODEL,
        "model to use: a Hugging Face hub id, a local model directory, a .gguf file, or "
        "'smollm2-135m' for the bundled SmolLM2-135M-Instruct (runs on CPU, no download)",
    )
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = opt(
        "auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16"
    )
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")
    seed: int = opt(42, "random seed: same seed and arguments give the same output on CPU")
    attn_implementation: str | None = opt(
        None,
        "attention kernel (default: transformers' own choice); flash_attention_2 needs the "
        "flash-attn package and a GPU",
        choices=ATTN_IMPLEMENTATIONS,
    )
    load_in_8bit: bool = opt(
        False, "quantize the base weights to int8 on load (bitsandbytes); LoRA trains on top"
    )
    load_in_4bit: bool = opt(
        False, "quantize the base weights to 4-bit NF4 on load (bitsandbytes, QLoRA)"
    )

    def __post_init__(self) -> None:
        # at construction, so every command refuses a bad combination before any work
        check_model_options(self.attn_implementation, self.load_in_8bit, self.load_in_4bit)


# ---------------------------------------------------------------- generation
@dataclass
class GenerateConfig(ModelArgs):
    x0_file: str | None = opt(None, "text/Markdown file holding the prompt to bake (x0)")
    question_dataset: str | None = opt(
        None, "JSONL question set(s) with a 'question' field; comma-separate several files"
    )
    traj_out_file: str | None = opt(None, "where to write the trajectories (JSONL)")
    num_questions: int = opt(100, "how many questions to use (after a seeded shuffle)")
    num_sequences_per_question: int = opt(25, "answers sampled per question")
    max_sequence_length: int = opt(300, "maximum NEW tokens per answer")
    min_sequence_length: int = opt(
        1, "minimum NEW tokens per answer (end-of-turn is suppressed before it)"
    )
    temperature: float = opt(1.0, "sampling temperature (> 0)")
    top_p: float | None = opt(None, "nucleus sampling; default: the model's generation config")
    top_k: int | None = opt(None, "top-k sampling; default: the model's generation config")
    batch_size: int = opt(16, "sequences generated at once; batches mix questions (left padding)")
    enable_thinking: bool | None = opt(
        None, "Qwen3 thinking switch passed to the chat template (default: the template's own)"
    )
    shuffle: bool = opt(True, "shuffle the question set with --seed before taking questions")
    cache_implementation: str = opt(
        "dynamic",
        "KV cache for decoding: dynamic, or static (fixed-size; on CUDA transformers then "
        "compiles the decoding step with torch.compile: faster after a warm-up)",
        choices=["dynamic", "static"],
    )
    compile: bool = opt(True, "with --cache_implementation static on CUDA: torch.compile decoding")
    engine: str = opt(
        "auto",
        "sampling engine (sampling.py): auto picks the fastest for the device; hf is "
        "transformers' generate",
        choices=engine_names(),
    )

    def validate(self) -> None:
        require(self.x0_file is not None, "--x0_file is required (the prompt to bake)")
        require(self.question_dataset is not None, "--question_dataset is required (JSONL)")
        require(self.traj_out_file is not None, "--traj_out_file is required (output JSONL)")
        for name in (
            "num_questions",
            "num_sequences_per_question",
            "max_sequence_length",
            "batch_size",
        ):
            require(
                getattr(self, name) > 0, f"--{name} must be positive, got {getattr(self, name)}"
            )
        require(
            self.min_sequence_length >= 0,
            f"--min_sequence_length must be >= 0, got {self.min_sequence_length}",
        )
        require(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        require(
            self.max_sequence_length >= self.min_sequence_length,
            f"--max_sequence_length ({self.max_sequence_length}) is smaller than "
            f"--min_sequence_length ({self.min_sequence_length})",
        )
        require(self.top_p is None or 0 < self.top_p <= 1, "--top_p must be in (0, 1]")
        require(self.top_k is None or self.top_k >= 0, "--top_k must be >= 0")


# ---------------------------------------------------------------- training
@dataclass
class LoraArgs:
    r: int = opt(32, "LoRA rank", "-r")
    lora_alpha: float = opt(1.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    target_modules: str = opt(
        "q_proj,k_proj,v_proj,o_proj", "comma-separated module names that get LoRA adapters"
    )

    def validate_lora(self) -> None:
        require(self.r > 0, f"-r must be positive, got {self.r}")
        require(0 <= self.lora_dropout < 1, "--lora_dropout must be in [0, 1)")
        require(bool(self.target_modules.strip()), "--target_modules is empty")


@dataclass
class TrainConfig(LoraArgs, ModelArgs):
    data_path: str | None = opt(None, "training trajectories (JSONL from generate_data.py)")
    val_path: str | None = opt(None, "validation trajectories (JSONL); the best epoch is kept")
    out_dir: str | None = opt(None, "output directory for the adapter, logs and plots")
    num_epochs: int = opt(10, "passes over the training trajectories")
    batch_size: int = opt(10, "trajectories per optimizer step")
    learning_rate: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    save_every: int = opt(10, "also save the adapter to epoch_N/ every N epochs (0: never)")
    max_traj_len: int | None = opt(
        None, "truncate each trajectory to this many generated tokens (default: no limit)"
    )
    kl_chunk_size: int = opt(
        512, "token rows per KL chunk: bounds memory of the [tokens x vocab] tensors"
    )
    plot: bool = opt(True, "write kl_curve.png")
    resume: bool = opt(
        False,
        "continue from <out_dir>/checkpoint (adapter, optimizer, scheduler, RNG, epoch, best "
        "validation), written after every epoch; starts fresh if there is none",
    )
    # speed-ups (teacher.py, forward.py); each can be switched off for the benchmark
    teacher_cache: str = opt(
        "off",
        "cache the teacher's log-probs at the generated tokens once, before epoch 1: exact "
        "(float32 [tokens x vocab] on the CPU, the same loss; falls back to topk above "
        "--teacher_cache_max_gb) or topk (top-k log-probs + tail mass: an approximate KL)",
        choices=["off", "exact", "topk"],
    )
    teacher_topk: int = opt(64, "log-probs kept per token by --teacher_cache topk")
    teacher_cache_max_gb: float = opt(4.0, "largest exact teacher cache, in GB of CPU memory")
    prefix_reuse: bool = opt(
        True,
        "run each shared prompt prefix once per batch, for teacher and student: the batch "
        "becomes one packed sequence (the prefix every row shares, each distinct prompt once, "
        "then the answers; no padding) under a tree attention mask; exact",
    )
    length_bucketing: bool = opt(
        False, "batch trajectories of similar length together (less padding), in random order"
    )
    gradient_checkpointing: bool = opt(
        False, "recompute decoder activations in backward: less memory, a third more compute"
    )
    fsdp: bool = opt(
        False,
        "for models that do not fit one GPU: shard the frozen base weights and the LoRA "
        "weights of every decoder layer across the processes with PyTorch FSDP2 "
        "(fully_shard); embeddings and LM head stay whole on each GPU. Needs torchrun "
        "with 2 or more processes",
    )

    def validate(self) -> None:
        require(self.data_path is not None, "--data_path is required (training trajectories)")
        require(self.out_dir is not None, "--out_dir is required (where the adapter goes)")
        for name in ("num_epochs", "batch_size", "kl_chunk_size"):
            require(
                getattr(self, name) > 0, f"--{name} must be positive, got {getattr(self, name)}"
            )
        require(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}")
        require(self.save_every >= 0, "--save_every must be >= 0")
        require(self.max_traj_len is None or self.max_traj_len > 0, "--max_traj_len must be > 0")
        require(self.teacher_topk > 0, f"--teacher_topk must be positive, got {self.teacher_topk}")
        require(self.teacher_cache_max_gb > 0, "--teacher_cache_max_gb must be > 0")
        if self.fsdp:
            require(
                world_size() > 1,
                "--fsdp true shards the model across processes: launch with torchrun "
                "--nproc_per_node N (N >= 2), or drop --fsdp to train in one process",
            )
        self.validate_lora()
