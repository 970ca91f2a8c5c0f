"""Chat formatting: render (system prompt, user prompt) with the model's own chat template.

    from promptbake.chat import format_prompt
    format_prompt("You are a helpful assistant.", "What is 2+2?", tokenizer=tok)
    # '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n'
    # 'What is 2+2?<|im_end|>\\n<|im_start|>assistant\\n'

This is the one place prompts are rendered; generation, training, evaluation and
re-prompting all go through it, so "prompted" always means the same string.
"""

from __future__ import annotations

import warnings


def manual_chatml(system_prompt: str | None, user_prompt: str) -> str:
    """ChatML by hand, for tokenizers that ship no chat template (seed troubleshooting 7)."""
    prompt = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt is not None else ""
    return prompt + f"<|im_start|>user\n{user_prompt}<|im_end|>\n<|im_start|>assistant\n"


def format_prompt(
    system_prompt: str | None,
    user_prompt: str,
    use_system: bool = True,
    tokenizer=None,
    enable_thinking: bool | None = None,
) -> str:
    """Render a conversation up to the assistant header, ready for generation.

    Args:
        system_prompt: the prompt being baked (x0).
        user_prompt: the question.
        use_system: False renders the *unprompted* conversation (no system message;
            the template may still add its own default one, e.g. SmolLM2 does).
        tokenizer: required; its ``apply_chat_template`` does the rendering.
        enable_thinking: Qwen3's thinking switch, passed to the template only when set,
            so ``None`` keeps the template's own default.
    """
    if tokenizer is None:
        raise ValueError("tokenizer parameter is required for Qwen3 format_prompt()")
    system = system_prompt if use_system else None
    if getattr(tokenizer, "chat_template", None) is None:
        warnings.warn(
            "tokenizer has no chat template; falling back to manual ChatML formatting",
            stacklevel=2,
        )
        return manual_chatml(system, user_prompt)
    messages = [{"role": "user", "content": user_prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **extra
    )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of an already rendered prompt: no extra special tokens (no doubled BOS)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
