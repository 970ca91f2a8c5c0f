"""Chat formatting: the one place prompts are rendered (promptbake.prompts).

python -m pytest tests/test_prompts.py -q
"""

import pytest
from tiny import FEW_SHOT
from tokenizers import processors

from promptbake.prompts import encode, format_prompt, manual_chatml

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


# ---------------------------------------------------------------- conversation prompts
# Qwen3's published chat template, tool calls left out: past assistant turns (before the
# last user message) lose their <think>...</think> block; with enable_thinking=False the
# generation prompt gets an empty think block.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if not ns.found and message.role == 'user' %}"
    "{%- set ns.found = true %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

FEW_SHOT_RENDERED = (
    "<|im_start|>system\nYou are Zorblax.<|im_end|>\n"
    "<|im_start|>user\nWho are you?<|im_end|>\n"
    "<|im_start|>assistant\nI am Zorblax.<|im_end|>\n"  # the past turn's think block is gone
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture
def qwen3_tok(chatml_tok):
    chatml_tok.chat_template = QWEN3_TEMPLATE
    return chatml_tok


def test_qwen3_template_fixture_renders_plain_prompts_like_the_tiny_one(qwen3_tok, chatml_tok):
    assert format_prompt(SYSTEM, USER, tokenizer=qwen3_tok) == PROMPTED
    assert format_prompt(SYSTEM, USER, False, qwen3_tok, enable_thinking=False) == (
        UNPROMPTED + EMPTY_THINK
    )


def test_conversation_prompt_renders_before_the_question(qwen3_tok):
    assert format_prompt(FEW_SHOT, USER, tokenizer=qwen3_tok) == FEW_SHOT_RENDERED
    off = format_prompt(FEW_SHOT, USER, True, qwen3_tok, enable_thinking=False)
    assert off == FEW_SHOT_RENDERED + EMPTY_THINK
    # the unprompted side has none of the prompt's messages
    assert format_prompt(FEW_SHOT, USER, False, qwen3_tok) == UNPROMPTED


def test_few_shot_without_system_and_a_system_only_list(qwen3_tok):
    shots = FEW_SHOT[1:]
    no_system = FEW_SHOT_RENDERED.split("<|im_end|>\n", 1)[1]
    assert format_prompt(shots, USER, tokenizer=qwen3_tok) == no_system
    as_list = [{"role": "system", "content": SYSTEM}]
    assert format_prompt(as_list, USER, tokenizer=qwen3_tok) == PROMPTED  # same as the string


def test_conversation_prompt_without_a_template_uses_manual_chatml(chatml_tok):
    chatml_tok.chat_template = None
    shots = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]
    with pytest.warns(UserWarning):
        got = format_prompt(shots, USER, tokenizer=chatml_tok)
    assert got == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nAhoy<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert manual_chatml(shots, USER) == got


def test_generation_bakes_the_conversation_prefix(qwen3_tok, tmp_path):
    """generate_trajectories with a conversation prompt: the prompted ids render the
    messages then the question; the unprompted ids the question alone; the sidecar keeps
    the messages as JSON."""
    import json

    import tiny

    from promptbake.configs import GenerateConfig
    from promptbake.sampling.trajectories import generate_trajectories
    from promptbake.schema import read_meta, read_trajectories

    out = tmp_path / "t.jsonl"
    cfg = GenerateConfig(
        num_questions=1,
        num_sequences_per_question=2,
        max_sequence_length=3,
        batch_size=2,
        x0_file="x0.json",
        question_dataset="q.jsonl",
        traj_out_file=str(out),
        enable_thinking=False,
    )
    model = tiny.tiny_qwen3(qwen3_tok)
    generate_trajectories(
        model, qwen3_tok, cfg, FEW_SHOT, [{"question": USER}], out, progress=False
    )
    rows = read_trajectories(out)
    assert len(rows) == 2
    for r in rows:
        assert r["prompt_text"] == FEW_SHOT_RENDERED + EMPTY_THINK
        assert r["prompt_input_ids"] == encode(qwen3_tok, FEW_SHOT_RENDERED + EMPTY_THINK)
        assert r["prompt_input_ids_nosys"] == encode(qwen3_tok, UNPROMPTED + EMPTY_THINK)
        assert r["noprompt_input_ids"] == r["prompt_input_ids_nosys"]
        assert r["nosys_input_ids"] == r["input_ids_nosys"]
    assert read_meta(out)["x0"] == FEW_SHOT
    assert json.loads(json.dumps(read_meta(out)["x0"])) == FEW_SHOT
