"""How a model sees a prompt: the raw text, a format string, or its tokenizer's chat template.

A prompt is a text, or a conversation (a list of {"role", "content"} messages, as a chat request
sends it): a chat model reads the conversation through its template; a model reading raw text reads it
as a plain transcript (`plain_text`)."""
from __future__ import annotations

from typing import Union

from core.errors import UserError

RAW = "{prompt}"
CHAT = "chat"
Prompt = Union[str, list]  # a text, or a list of chat messages


def plain_text(prompt: Prompt) -> str:
    """A prompt as raw text: a lone user message is its content; a longer conversation a transcript
    with one "role: content" line per message and the assistant's turn open at the end."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0]["content"])
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"


def render(prompt: Prompt, prompt_format: str | None, tokenizer=None) -> str:
    """Render `prompt` in `prompt_format`: None or "{prompt}" (as is), "chat" (the tokenizer's chat
    template, the text as one user turn, generation prompt added), or any string with a `{prompt}` field."""
    if prompt_format in (None, RAW):
        return plain_text(prompt)
    if prompt_format == CHAT:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("prompt format 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if "{prompt}" not in prompt_format:
        raise UserError(f"prompt format {prompt_format!r} has no {{prompt}} field; use e.g. 'Q: {{prompt}}\\nA:'")
    return prompt_format.replace("{prompt}", plain_text(prompt))


def chat_expected(expert_tokenizer, anti_tokenizer, expert_ends, anti_ends) -> bool:
    """Whether an expert is a chat model steered against the base it was tuned from (Llama-2-chat against
    Llama-2, Qwen2.5-Instruct against Qwen2.5): it has a chat template, and its template or the ids that
    end its turns differ from the anti-expert's. Such an expert reads prompts as a user turn, as in the paper."""
    template = getattr(expert_tokenizer, "chat_template", None)
    if not template:
        return False
    return template != getattr(anti_tokenizer, "chat_template", None) or set(expert_ends) != set(anti_ends)
