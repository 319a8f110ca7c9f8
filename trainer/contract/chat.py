"""The chat template used when the tokenizer has none of its own (the embedded model)."""

from __future__ import annotations

# Role-tagged turns, then the assistant tag as the generation prompt. The server serves with it
# and the trainer trains with it, so both must read this one constant.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
