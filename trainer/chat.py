"""How a training example becomes tokens, for both shapes: prompt/completion and chat.

What ties training to serving: a prompt is tokenized exactly as the server tokenizes what it
sends to the engine (``tokenizer(text)``, special tokens added: ``CompletionService._encode``
in ``server/openai/serving.py``), and a chat prompt is the chat template's rendering with
``add_generation_prompt=True``, as ``CompletionService._prepare_chat`` renders it, with the
same fallback template. So ``completions`` answers a prompt/completion task as trained, and
``chat.completions`` a chat task.

A chat example is rendered incrementally: assistant turn *i* is the tokens of the rendering
of ``messages[: i + 1]`` after those of ``messages[:i]`` rendered with the generation prompt,
i.e. its content and the template's end-of-turn tokens, never the role headers. That needs a
*prefix-stable* template (each rendering starts with the previous one); one that is not is
refused with a ``ValueError`` rather than trained on the wrong tokens.

Imports neither torch nor transformers at run time: the API process imports
:data:`DEFAULT_CHAT_TEMPLATE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from trainer.config import ChatExample, ChatMessage, Example, TrainingExample
from trainer.contract.chat import DEFAULT_CHAT_TEMPLATE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Tokens(NamedTuple):
    """One example's token ids and, per token, whether the loss predicts it."""

    ids: list[int]
    trained: list[bool]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s ids as the server sends them to the engine (special tokens such as BOS added)."""
    return list(tokenizer(text)["input_ids"])


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    *,
    add_generation_prompt: bool = False,
) -> str:
    """``messages`` rendered with the template the server uses: the tokenizer's own, else
    :data:`DEFAULT_CHAT_TEMPLATE` (passed per call, so a shared tokenizer is left as it is).
    Only role and content reach the template, as in a chat completion request."""
    from jinja2 import TemplateError  # what transformers renders with; only rendering needs it

    conversation = [{"role": message.role, "content": message.content} for message in messages]
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:  # e.g. a template that insists on alternating user/assistant turns
        raise ValueError(f"the chat template refused the messages: {error}") from error
    return str(text)


def example_tokens(tokenizer: PreTrainedTokenizerBase, example: TrainingExample, max_seq_len: int) -> Tokens:
    """``example``'s tokens, at most ``max_seq_len`` of them, and which ones are learned.

    Prompt/completion: prompt + completion + EOS, the completion and EOS learned. Chat: the
    conversation up to its last trained assistant turn, every trained turn learned.
    """
    if isinstance(example, ChatExample):
        tokens = _chat_tokens(tokenizer, example)
    else:
        tokens = _pair_tokens(tokenizer, example)
    tokens = _keep_end(tokens, max_seq_len)
    if len(tokens.ids) < 2:
        raise ValueError("nothing to learn from (empty prompt and completion)")
    return tokens


def prompt_and_answer(tokenizer: PreTrainedTokenizerBase, example: TrainingExample) -> tuple[list[int], str]:
    """The prompt ids a served model gets for ``example`` and the text it should answer: what an
    exact-match accuracy of a trained task compares.

    Prompt/completion: the prompt's ids (as ``completions`` and training tokenize it) and the
    completion. Chat: the messages before the last assistant turn rendered with the generation
    prompt (as ``chat.completions`` renders them) and that turn's content. The generated text
    may end with the template's end-of-turn text (DEFAULT_CHAT_TEMPLATE's newline), which a
    comparison should strip.
    """
    if isinstance(example, ChatExample):
        *context, answer = example.messages  # a chat example ends with an assistant turn
        text = render_chat(tokenizer, context, add_generation_prompt=True)
        return encode_prompt(tokenizer, text), answer.content
    return encode_prompt(tokenizer, example.prompt), example.completion


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    return int(tokenizer.eos_token_id)


def _pair_tokens(tokenizer: PreTrainedTokenizerBase, example: Example) -> Tokens:
    """Prompt and completion are tokenized separately so the boundary between them is exact;
    EOS after the completion teaches the model to stop."""
    prompt = encode_prompt(tokenizer, example.prompt)
    completion = [*tokenizer(example.completion, add_special_tokens=False)["input_ids"], _eos_id(tokenizer)]
    return Tokens(prompt + completion, [False] * len(prompt) + [True] * len(completion))


def _chat_tokens(tokenizer: PreTrainedTokenizerBase, example: ChatExample) -> Tokens:
    """The conversation up to its last trained turn, tokenized whole (as a later request with
    this history would be), with every trained assistant turn marked.

    When the last turn's tokens hold no EOS (a template without one, such as
    DEFAULT_CHAT_TEMPLATE), EOS is appended and learned, so the model stops after its answer
    as a prompt/completion task does; earlier turns are left as the template renders them,
    since the conversation continues after them.
    """
    turns = [i for i, message in enumerate(example.messages) if message.trained]
    messages = example.messages[: turns[-1] + 1]
    ids = encode_prompt(tokenizer, render_chat(tokenizer, messages))
    spans = [_turn_span(tokenizer, messages, turn, ids) for turn in turns]
    trained = [any(position in span for span in spans) for position in range(len(ids))]
    eos = _eos_id(tokenizer)
    if eos not in ids[spans[-1].start :]:  # the last span runs to the end of ids
        ids, trained = [*ids, eos], [*trained, True]
    return Tokens(ids, trained)


def _turn_span(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage], turn: int, ids: list[int]
) -> range:
    """Where assistant message ``turn`` lies in ``ids``, the tokens of the whole conversation:
    after the earlier messages rendered with the generation prompt (what ``chat.completions``
    would send the engine), up to the end of the rendering that includes the turn."""
    prompt = encode_prompt(tokenizer, render_chat(tokenizer, messages[:turn], add_generation_prompt=True))
    full = encode_prompt(tokenizer, render_chat(tokenizer, messages[: turn + 1]))
    if full[: len(prompt)] != prompt:
        raise ValueError(
            f"the chat template is not prefix-stable at message {turn}: the messages before it rendered "
            "with add_generation_prompt=True are not the start of the rendering that includes it, so "
            "the assistant's tokens cannot be told apart from the prompt"
        )
    if ids[: len(full)] != full:
        raise ValueError(
            f"the chat template is not prefix-stable at message {turn}: the conversation up to it is "
            "rendered differently once later messages follow (e.g. earlier turns are shortened)"
        )
    return range(len(prompt), len(full))


def _keep_end(tokens: Tokens, max_seq_len: int) -> Tokens:
    """The last ``max_seq_len`` tokens, so the context lost is the oldest; but a last answer longer
    than that keeps its start (the tokens a request generates first). The last answer is the
    trailing run of trained tokens: both shapes end with it."""
    ids, trained = tokens
    answer = next((i for i in range(len(trained), 0, -1) if not trained[i - 1]), 0)
    first = max(0, min(len(ids) - max_seq_len, answer))
    return Tokens(ids[first : first + max_seq_len], trained[first : first + max_seq_len])
