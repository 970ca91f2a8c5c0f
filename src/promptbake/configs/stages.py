"""The pipeline stages' configs: the model flags every command shares, generation,
LoRA training, and the bake (and pursuit) built from them."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..distributed import world_size
from ..errors import UserError
from ..loss import DIVERGENCE_NAMES, check_divergence
from ..models import ATTN_IMPLEMENTATIONS, DEFAULT_MODEL, check_model_options, resolve_device
from .choices import ENGINE_NAMES
from .fields import (
    check_int_ranges,
    check_regex,
    check_temperature,
    field_values,
    opt,
    require,
    require_finite,
    with_defaults,
)


# ---------------------------------------------------------------- shared by all stages
@dataclass
class ModelArgs:
    # fields the command fills in itself: not flags, not config-file keys (BakeConfig)
    SET_BY_COMMAND: ClassVar[tuple[str, ...]] = ()

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
        check_int_ranges(self)  # every count and the seed, for every command


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
        "sampling engine (sampling/): hf is transformers' generate, static a compiled "
        "static-cache decode step (CUDA), vllm the vLLM engine (pip install "
        "'promptbake[vllm]'; it returns top-k log-probs only, so training computes the exact "
        "teacher itself); auto takes vllm on CUDA when installed, else static on CUDA, else hf",
        choices=list(ENGINE_NAMES),
    )
    vllm_memory: float | None = opt(
        None,
        "with --engine vllm: the share of the GPU memory vLLM may hold (default 0.3, leaving "
        "the rest to training in the same process); on a CPU the share of RAM for its KV "
        "cache (default: 1 GB)",
    )
    save_teacher_cache: str = opt(
        "auto",
        "write the teacher's log-probs computed while sampling next to the trajectories "
        "(<traj_out_file>.teacher.safetensors, float32 [tokens x vocab]) so that "
        "train_loop.py skips its teacher pass (same loss): auto when the table fits "
        "--save_teacher_cache_max_gb, always, or never",
        choices=["auto", "always", "never"],
    )
    save_teacher_cache_max_gb: float = opt(
        1.0, "with --save_teacher_cache auto: the largest table written, in GB"
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
        require_finite(self, "temperature", "top_p")
        require(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        check_temperature(self.temperature, greedy_zero=False)
        require(
            self.max_sequence_length >= self.min_sequence_length,
            f"--max_sequence_length ({self.max_sequence_length}) is smaller than "
            f"--min_sequence_length ({self.min_sequence_length})",
        )
        require(self.top_p is None or 0 < self.top_p <= 1, "--top_p must be in (0, 1]")
        require(self.top_k is None or self.top_k >= 0, "--top_k must be >= 0")
        require_finite(self, "save_teacher_cache_max_gb", "vllm_memory")
        require(
            self.vllm_memory is None or 0 < self.vllm_memory < 1,
            f"--vllm_memory is a share in (0, 1), got {self.vllm_memory}",
        )
        require(self.save_teacher_cache_max_gb > 0, "--save_teacher_cache_max_gb must be > 0")


# ---------------------------------------------------------------- training
LR_SCHEDULES = ("constant", "linear", "cosine")  # --lr_schedule (training.setup.lr_factor)


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
        require_finite(self, "lora_alpha", "lora_dropout")
        require(self.lora_alpha > 0, f"--lora_alpha must be > 0, got {self.lora_alpha}")
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
    lr_schedule: str = opt(
        "constant",
        "learning rate after warm-up: constant, or linear / cosine decay to 0 at the end of "
        "the run (the --num_epochs ceiling, or --max_train_seconds when set, whichever "
        "comes first), so the last steps refine instead of overshooting",
        choices=list(LR_SCHEDULES),
    )
    save_every: int = opt(10, "also save the adapter to epoch_N/ every N epochs (0: never)")
    max_traj_len: int | None = opt(
        None, "truncate each trajectory to this many generated tokens (default: no limit)"
    )
    kl_chunk_size: int = opt(
        0,
        "token rows per KL chunk: bounds memory of the [tokens x vocab] tensors; 0 (auto): "
        "512 on the CPU, on CUDA as many as keep three float32 [rows x vocab] copies within "
        "an eighth of the free GPU memory (512 to 8192)",
    )
    plot: bool = opt(True, "write kl_curve.png")
    resume: bool | None = opt(
        None,
        "true: continue from <out_dir>/checkpoint (adapter, optimizer, scheduler, RNG, epoch, "
        "best validation), written after every epoch; false: delete it and start over. Not "
        "given: refused when <out_dir> holds a checkpoint, so none is lost by accident",
    )
    # speed-ups (training/teacher.py, training/forward.py); each can be switched off for bench/
    teacher_cache: str = opt(
        "auto",
        "the frozen teacher's log-probs at the generated tokens: auto (computed once before "
        "epoch 1 as an exact float32 [tokens x vocab] table on the CPU when it fits "
        "--teacher_cache_max_gb, else the teacher runs every step: exact either way), exact "
        "(the same; one log line when it does not fit), off (teacher every step), or topk "
        "(top-k log-probs + tail mass: an approximate KL, only when asked for)",
        choices=["auto", "off", "exact", "topk"],
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
    autocast: str = opt(
        "off",
        "mixed precision for the training forwards of float32 weights: bf16 runs the "
        "decoder's matmuls in bfloat16 (torch.autocast; the LM head, the KL, the LoRA weights "
        "and the optimizer stay float32), auto does so where the device multiplies bf16 "
        "natively (a bf16-capable GPU, a CPU with AMX or AVX-512 BF16), off is exact float32. "
        "Not exact: the loss moves by bf16 rounding",
        choices=["off", "bf16", "auto"],
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

    # when to stop, what to train on, where to report (train.py, onpolicy.py, outputs.py)
    patience: int = opt(
        0,
        "stop after this many epochs without a better validation KL (the best adapter is "
        "kept; --num_epochs is the ceiling); 0: run every epoch",
    )
    max_train_seconds: float = opt(
        0.0,
        "a time budget: training ends within this many seconds of its start (teacher "
        "cache, validation and saves included): no step starts unless it and its epoch's "
        "validation and save still fit, so the last epoch ends early and is validated "
        "and saved like any other; a resumed run continues the same budget; 0: no limit",
    )
    on_policy: float = opt(
        0.0,
        "share of each epoch's batches sampled from the student itself (adapter on, no "
        "prompt) on the training questions, scored by the teacher per step (0: the paper's "
        "off-policy baking). Needs the prompt and questions: --x0_file/--question_dataset "
        "or the trajectory file's .meta.json. With --engine vllm each on-policy batch after "
        "an optimizer step first syncs the adapter: its LoRA weights are written to a "
        "temporary folder and vLLM loads them as a new LoRA (a save of the adapter plus an "
        "adapter load; the base weights are never copied or merged)",
    )
    x0_file: str | None = opt(
        None, "with --on_policy: the baked prompt (default: the trajectory file's sidecar)"
    )
    question_dataset: str | None = opt(
        None, "with --on_policy: training questions, JSONL (default: the sidecar's selection)"
    )
    divergence: str = opt(
        "forward_kl",
        "what is minimised: forward_kl KL(teacher || student), reverse_kl "
        "KL(student || teacher), or jsd (generalized Jensen-Shannon, --jsd_beta)",
        choices=DIVERGENCE_NAMES,
    )
    jsd_beta: float = opt(0.5, "with --divergence jsd: the mixture weight beta, in [0, 1]")
    report_to: str = opt(
        "none",
        "experiment tracker: tensorboard writes per-step loss, learning rate and tokens/s and "
        "per-epoch KL to <out_dir>/tensorboard (pip install 'promptbake[tensorboard]')",
        choices=["none", "tensorboard"],
    )

    def validate(self) -> None:
        require(self.data_path is not None, "--data_path is required (training trajectories)")
        require(self.out_dir is not None, "--out_dir is required (where the adapter goes)")
        for name in ("num_epochs", "batch_size"):
            require(
                getattr(self, name) > 0, f"--{name} must be positive, got {getattr(self, name)}"
            )
        require(
            self.kl_chunk_size >= 0,
            f"--kl_chunk_size must be >= 0 (0: auto), got {self.kl_chunk_size}",
        )
        require_finite(
            self, "learning_rate", "weight_decay", "teacher_cache_max_gb", "on_policy", "jsd_beta"
        )
        require(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}")
        require(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        require(
            self.lr_schedule in LR_SCHEDULES,
            f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )
        require(self.save_every >= 0, "--save_every must be >= 0")
        require_finite(self, "max_train_seconds")
        require(self.max_train_seconds >= 0, "--max_train_seconds must be >= 0 (0: no limit)")
        require(self.max_traj_len is None or self.max_traj_len > 0, "--max_traj_len must be > 0")
        require(self.teacher_topk > 0, f"--teacher_topk must be positive, got {self.teacher_topk}")
        require(self.teacher_cache_max_gb > 0, "--teacher_cache_max_gb must be > 0")
        if self.fsdp:
            require(
                world_size() > 1,
                "--fsdp true shards the model across processes: launch with torchrun "
                "--nproc_per_node N (N >= 2), or drop --fsdp to train in one process",
            )
        require(self.patience >= 0, f"--patience must be >= 0, got {self.patience}")
        require(0 <= self.on_policy <= 1, f"--on_policy must be in [0, 1], got {self.on_policy}")
        check_divergence(self.divergence, self.jsd_beta)
        require(
            not (
                self.attn_implementation == "flex_attention"
                and resolve_device(self.device).type == "cpu"
            ),
            "--attn_implementation flex_attention cannot train on the CPU (PyTorch has no "
            "FlexAttention backward there): use sdpa, or train on a GPU",
        )
        require(
            not (self.on_policy > 0 and self.fsdp),
            "--on_policy with --fsdp is not supported: sampling needs the whole model on each "
            "process; drop one of them",
        )
        self.validate_lora()


# ---------------------------------------------------------------- bake, pursuit
# Bake's own defaults for the stage fields it inherits (the stages keep the seed's values),
# chosen on `make bench-fidelity` (bench/README.md, README "Why `promptbake bake` has other
# defaults"); BAKE_WHY is the reason each one shows in `bake --help`.
BAKE_DEFAULTS: dict[str, Any] = {
    "question_dataset": "data/questions.jsonl",
    "out_dir": "runs/bake",
    "num_questions": 64,
    "num_sequences_per_question": 4,
    "max_sequence_length": 64,
    "num_epochs": 12,
    "patience": 3,
    "batch_size": 4,
    "learning_rate": 2e-3,
    "save_every": 0,
    "teacher_cache": "exact",
    "r": 8,
    "lora_alpha": 16.0,
    "divergence": "forward_kl",
    "on_policy": 0.0,
    "temperature": 1.0,
    "lr_schedule": "constant",
    "warmup_steps": 0,
}
BAKE_WHY: dict[str, str] = {
    "learning_rate": "twice the paper's: the adapter learns in the time the paper's method "
    "takes, without overshooting on the chain-of-thought bake as 3e-3 did; LoRA on the MLP "
    "projections too learns more per epoch but finishes fewer epochs in that time "
    "(numbers: README, bake defaults)",
    "r": "rank 8 at scale alpha/r = 2: a larger scale was no better than the higher lr",
    "lora_alpha": "scale alpha/r = 2 (see -r); the seed's alpha 1 with r 32 (scale 1/32) "
    "learns very slowly",
    "batch_size": "twice the optimizer steps of batch 8 in the same time, which lowered the "
    "held-out KL; batch 2 was no better (README, bake defaults)",
    "num_epochs": "a ceiling: --patience stops earlier once validation KL stops improving; "
    "the best epoch's adapter is kept",
    "patience": "validation KL on a few questions is noisy (it rises for an epoch or two "
    "and falls again), so a shorter patience stops too early",
    "divergence": "the paper's forward KL: at the paper's time reverse KL lost the persona's "
    "and the rare bake's name (in none of the answers) and JSD (beta 0.5) the rare one's; "
    "KL ratio +0.16 / +0.14 over the bakes (README, bake defaults)",
    "on_policy": "off: student-sampled batches (a quarter of them) meant fewer steps at the "
    "paper's time on a CPU: KL ratio +0.05, behaviour -8 points over the bakes; worth "
    "trying on a GPU with --engine vllm, where sampling is fast",
    "num_sequences_per_question": "4 answers per question and more epochs beat 8 or 16 "
    "at the paper's time (8: KL ratio +0.06 over the bakes; 16 finished no epoch)",
    "temperature": "the prompted model's own distribution: 1.5 helped the rare-name bake "
    "but lost the knowledge bake's fact in every answer, 2.0 lost the persona; KL ratio "
    "+0.03 / +0.10 over the bakes",
    "lr_schedule": "constant: a linear decay to the time budget with 4 warm-up steps gave "
    "KL ratio +0.02 and behaviour -3 points over the bakes",
    "warmup_steps": "none, as the constant schedule measured best (see --lr_schedule)",
}


# generation's --batch_size is bake's --gen_batch_size (BakeConfig.generate_config)
GEN_FLAG = re.compile(r"--batch_size\b")


@with_defaults(BAKE_DEFAULTS, BAKE_WHY)
@dataclass
class BakeConfig(TrainConfig, GenerateConfig):
    """Every GenerateConfig and TrainConfig field (inherited), bake's own few, and
    BAKE_DEFAULTS. `batch_size` is training's; generation's is --gen_batch_size."""

    # the files bake writes and reads itself, and its fixed question order
    SET_BY_COMMAND: ClassVar[tuple[str, ...]] = (
        "traj_out_file",
        "shuffle",
        "data_path",
        "val_path",
        # bake keeps the teacher's log-probs in memory: it writes no teacher sidecar
        "save_teacher_cache",
        "save_teacher_cache_max_gb",
    )

    prompt: str | None = opt(None, "the prompt to bake, as text (instead of --x0_file)")
    heldout: str | None = opt(
        None, "held-out JSONL questions: answered by base, prompted and baked model at the end"
    )
    marker: str | None = opt(
        None, "regex counted in the held-out answers, e.g. Zorblax (case-insensitive)"
    )
    val_fraction: float = opt(0.1, "share of the questions held out for validation KL")
    gen_batch_size: int = opt(32, "sequences generated at once")
    answer_tokens: int = opt(48, "new tokens per held-out answer")

    def validate(self) -> None:
        require(
            (self.x0_file is None) != (self.prompt is None),
            "give exactly one of --x0_file, --prompt",
        )
        require(0 <= self.val_fraction < 1, "--val_fraction must be in [0, 1)")
        check_regex(self.marker, "--marker")
        require(self.answer_tokens > 0, "--answer_tokens must be positive")
        # bake's own names first, then the stages' checks in the names the user typed
        require(
            self.gen_batch_size > 0, f"--gen_batch_size must be positive, got {self.gen_batch_size}"
        )
        try:
            self.generate_config("x").validate()
        except UserError as e:
            raise UserError(GEN_FLAG.sub("--gen_batch_size", str(e))) from None
        self.train_config().validate()

    def generate_config(self, out_file: str) -> GenerateConfig:
        return GenerateConfig(
            **{
                **field_values(self, GenerateConfig),
                "x0_file": self.x0_file or "<--prompt>",
                "traj_out_file": out_file,
                "batch_size": self.gen_batch_size,
                "shuffle": False,
            }
        )

    def train_config(self) -> TrainConfig:
        out = Path(self.out_dir)
        return TrainConfig(
            **{
                **field_values(self, TrainConfig),
                "data_path": str(out / "trajectories_train.jsonl"),
                "val_path": str(out / "trajectories_val.jsonl"),
                # a bake's --out_dir is its own run, redone by the same command (make demo
                # twice): its checkpoint is kept only when --resume true asks to continue
                "resume": bool(self.resume),
            }
        )


@dataclass
class PursueConfig(BakeConfig):
    rounds: int = opt(2, "rounds: round 1 is a normal bake, each later one bakes on top of it")
    out_dir: str = opt("runs/pursuit", "directory for round_1/ ... round_K/ and pursuit.md")

    def validate(self) -> None:
        super().validate()
        require(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        require(
            self.val_fraction > 0,
            "--val_fraction must be > 0: pursuit measures each round on validation trajectories",
        )

    def bake_config(self, out_dir: Path) -> BakeConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(BakeConfig)}
        return BakeConfig(**{**fields, "out_dir": str(out_dir)})
