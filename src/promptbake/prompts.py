"""Chat formatting: render (prompt, question) with the model's own chat template.

    from promptbake.chat import format_prompt
    format_prompt("You are a helpful assistant.", "What is 2+2?", tokenizer=tok)
    # '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n'
    # 'What is 2+2?<|im_end|>\\n<|im_start|>assistant\\n'

The prompt (x0) is a string (a system prompt) or a list of chat messages (a
conversation prefix: a system message and/or few-shot user/assistant turns, see
data.read_prompt); either way the prompted side renders it before the question and
the unprompted side renders the question alone.

This is the one place prompts are rendered; generation, training, evaluation and
re-prompting all go through it, so "prompted" always means the same string.
"""

from __future__ import annotations

import warnings

Prompt = str | list[dict]  # a system prompt, or chat messages rendered before the question


def prompt_messages(prompt: Prompt | None, user_prompt: str) -> list[dict]:
    """The conversation to render: the prompt's messages (if any), then the question."""
    if prompt is None:
        head = []
    elif isinstance(prompt, str):
        head = [{"role": "system", "content": prompt}]
    else:
        head = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return [*head, {"role": "user", "content": user_prompt}]


def manual_chatml(system_prompt: Prompt | None, user_prompt: str) -> str:
    """ChatML by hand, for tokenizers that ship no chat template (the migration
    guide's fallback when apply_chat_template is missing)."""
    turns = prompt_messages(system_prompt, user_prompt)
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
    return body + "<|im_start|>assistant\n"


def format_prompt(
    system_prompt: Prompt | None,
    user_prompt: str,
    use_system: bool = True,
    tokenizer=None,
    enable_thinking: bool | None = None,
) -> str:
    """Render a conversation up to the assistant header, ready for generation.

    Args:
        system_prompt: the prompt being baked (x0): a system prompt string, or a list
            of ``{"role", "content"}`` messages rendered before the question.
        user_prompt: the question.
        use_system: False renders the *unprompted* conversation (none of the prompt's
            messages; the template may still add its own default system message, e.g.
            SmolLM2 does).
        tokenizer: required; its ``apply_chat_template`` does the rendering.
        enable_thinking: Qwen3's thinking switch, passed to the template only when set,
            so ``None`` keeps the template's own default.
    """
    if tokenizer is None:
        raise ValueError("tokenizer parameter is required for Qwen3 format_prompt()")
    messages = prompt_messages(system_prompt if use_system else None, user_prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        warnings.warn(
            "tokenizer has no chat template; falling back to manual ChatML formatting",
            stacklevel=2,
        )
        return manual_chatml(system_prompt if use_system else None, user_prompt)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **extra
    )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of an already rendered prompt: no extra special tokens (no doubled BOS)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompts(
    tokenizer, x0: str | list[dict], questions: list[dict], enable_thinking: bool | None = None
) -> list[Prompt]:
    out = []
    for q in questions:
        with_sys = format_prompt(x0, q["question"], True, tokenizer, enable_thinking)
        no_sys = format_prompt(x0, q["question"], False, tokenizer, enable_thinking)
        out.append((encode(tokenizer, with_sys), encode(tokenizer, no_sys)))
    return out
