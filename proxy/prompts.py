"""How the expert sees a prompt: the raw text, a format string, or its tokenizer's chat template."""
from __future__ import annotations

from proxy.errors import UserError

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
