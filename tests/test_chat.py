"""Chat formatting: the one place prompts are rendered (promptbake.chat).

python -m pytest tests/test_chat.py -q
"""

import pytest
from tokenizers import processors

from promptbake.chat import encode, format_prompt, manual_chatml

SYSTEM = "You are a helpful assistant."
USER = "What is 2+2?"
PROMPTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)
UNPROMPTED = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


def test_prompted_string_is_exact_chatml(chatml_tok):
    assert format_prompt(SYSTEM, USER, tokenizer=chatml_tok) == PROMPTED


def test_use_system_false_drops_the_system_block(chatml_tok):
    assert format_prompt(SYSTEM, USER, use_system=False, tokenizer=chatml_tok) == UNPROMPTED


def test_enable_thinking_false_appends_an_empty_think_block(chatml_tok):
    off = format_prompt(SYSTEM, USER, tokenizer=chatml_tok, enable_thinking=False)
    assert off == PROMPTED + EMPTY_THINK
    off_nosys = format_prompt(SYSTEM, USER, False, chatml_tok, enable_thinking=False)
    assert off_nosys == UNPROMPTED + EMPTY_THINK


@pytest.mark.parametrize("flag", [True, None])
def test_enable_thinking_true_or_none_adds_nothing(chatml_tok, flag):
    assert format_prompt(SYSTEM, USER, tokenizer=chatml_tok, enable_thinking=flag) == PROMPTED


def test_tokenizer_is_required():
    with pytest.raises(ValueError, match="tokenizer"):
        format_prompt(SYSTEM, USER)


def test_missing_chat_template_falls_back_to_manual_chatml(chatml_tok):
    chatml_tok.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        got = format_prompt(SYSTEM, USER, tokenizer=chatml_tok)
    assert got == PROMPTED
    with pytest.warns(UserWarning):
        got_nosys = format_prompt(SYSTEM, USER, use_system=False, tokenizer=chatml_tok)
    assert got_nosys == UNPROMPTED


def test_manual_chatml_matches_the_template(chatml_tok):
    assert manual_chatml(SYSTEM, USER) == format_prompt(SYSTEM, USER, tokenizer=chatml_tok)
    assert manual_chatml(None, USER) == format_prompt(SYSTEM, USER, False, chatml_tok)


def test_encode_adds_no_special_tokens(chatml_tok):
    # Give the tokenizer a BOS that is prepended by default, like Llama-style tokenizers:
    # encoding a rendered prompt (which already starts with <|im_start|>) must not add a second.
    bos = "<|im_start|>"
    chatml_tok.bos_token = bos
    bos_id = chatml_tok.bos_token_id
    chatml_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, bos_id)]
    )
    text = format_prompt(SYSTEM, USER, tokenizer=chatml_tok)
    default = chatml_tok(text)["input_ids"]
    assert default[:2] == [bos_id, bos_id]  # the doubled BOS that encode() must avoid
    ids = encode(chatml_tok, text)
    assert ids == default[1:]
    assert ids[0] == bos_id and ids[1] != bos_id
    assert ids.count(bos_id) == 3  # the system, user and assistant headers, nothing else
    assert chatml_tok.decode(ids, skip_special_tokens=False) == text


def test_encode_roundtrips_the_prompt(chatml_tok):
    text = format_prompt(SYSTEM, USER, tokenizer=chatml_tok)
    ids = encode(chatml_tok, text)
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 2
    assert chatml_tok.decode(ids, skip_special_tokens=False) == text
