"""How the expert sees a prompt: the raw text, a format string, or its tokenizer's chat template."""
from __future__ import annotations

from core.errors import UserError

RAW = "{prompt}"
CHAT = "chat"


def render(prompt: str, prompt_format: str | None, tokenizer=None) -> str:
    """Render `prompt` in `prompt_format`: None or "{prompt}" (as is), "chat" (the tokenizer's chat
    template, one user turn, generation prompt added), or any string with a `{prompt}` field."""
    if prompt_format in (None, RAW):
        return prompt
    if prompt_format == CHAT:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("prompt format 'chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    if "{prompt}" not in prompt_format:
        raise UserError(f"prompt format {prompt_format!r} has no {{prompt}} field; use e.g. 'Q: {{prompt}}\\nA:'")
    return prompt_format.replace("{prompt}", prompt)


def chat_expected(expert_tokenizer, anti_tokenizer, expert_ends, anti_ends) -> bool:
    """Whether an expert is a chat model steered against the base it was tuned from (Llama-2-chat against
    Llama-2, Qwen2.5-Instruct against Qwen2.5): it has a chat template, and its template or the ids that
    end its turns differ from the anti-expert's. Such an expert reads prompts as a user turn, as in the paper."""
    template = getattr(expert_tokenizer, "chat_template", None)
    if not template:
        return False
    return template != getattr(anti_tokenizer, "chat_template", None) or set(expert_ends) != set(anti_ends)
