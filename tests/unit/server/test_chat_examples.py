"""Chat examples (OpenAI's chat fine-tuning format): what is learned, what the server would be
asked, training on them, and the API's validation of both example shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from server.errors import APIError
from server.openai.protocol import ChatCompletionRequest
from server.openai.serving import CompletionService
from server.settings import ServerSettings
from server.swap.registry import ModelRegistry
from server.training.protocol import TaskCreate
from server.training.service import parse_jsonl
from tests.support.models import make_model
from trainer.chat import DEFAULT_CHAT_TEMPLATE, prompt_and_answer
from trainer.config import ChatExample, ChatMessage, Example, Hyperparameters, resolve_method
from trainer.contract.board import JobBoard
from trainer.loop import IGNORE_INDEX, tokenize, train_task

# SmolLM2-Instruct's template: <|im_end|> closes every turn and is the tokenizer's EOS.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 =>\n<|_"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>")


def chat_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    """One token per character, BOS added like the embedded model's. With ``template`` (ChatML)
    EOS is <|im_end|>, as for SmolLM2-Instruct; without one the server's default template applies
    and EOS is </s>, which no turn of that template contains."""
    vocab = {token: i for i, token in enumerate(SPECIAL)} | {c: i + len(SPECIAL) for i, c in enumerate(CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>" if template else "</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = template
    return tokenizer


def chat(*turns: tuple[str, str] | tuple[str, str, int]) -> ChatExample:
    return ChatExample(messages=tuple(ChatMessage(*turn) for turn in turns))  # type: ignore[arg-type]


def learned(
    tokenizer: PreTrainedTokenizerBase, example: Example | ChatExample, max_seq_len: int = 512
) -> list[str]:
    """The text of each run of labelled tokens."""
    [(ids, labels)] = tokenize(tokenizer, [example], max_seq_len)
    runs: list[list[int]] = []
    for position, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        assert label == ids[position]
        if position == 0 or labels[position - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(label)
    return [tokenizer.decode(run) for run in runs]


class ReadyEngine:
    """The service's engine, as far as request preparation looks at it."""

    ready = True


CONVERSATION = chat(
    ("system", "be brief"), ("user", "ab"), ("assistant", "cd"), ("user", "x"), ("assistant", "yy")
)


# --------------------------------------------------------------------------------- rendering


def test_chatml_learns_every_assistant_turn_and_its_end_of_turn_only() -> None:
    assert learned(chat_tokenizer(CHATML), CONVERSATION) == ["cd<|im_end|>\n", "yy<|im_end|>\n"]


def test_default_template_learns_the_turns_and_eos_after_the_last() -> None:
    """DEFAULT_CHAT_TEMPLATE has no end-of-turn token: EOS is appended so the model stops."""
    tokenizer = chat_tokenizer(None)
    [(ids, _)] = tokenize(tokenizer, [CONVERSATION], 512)
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION.messages],
        chat_template=DEFAULT_CHAT_TEMPLATE,
        tokenize=False,
    )
    assert tokenizer.decode(ids) == f"<s>{rendered}</s>"
    assert tokenizer.chat_template is None, "the shared tokenizer is left as it was"
    assert learned(tokenizer, CONVERSATION) == ["cd\n", "yy\n</s>"]


@pytest.mark.parametrize("template", [CHATML, None])
def test_weight_0_turns_are_context_only(template: str | None) -> None:
    tokenizer = chat_tokenizer(template)
    first_skipped = chat(("user", "ab"), ("assistant", "cd", 0), ("user", "x"), ("assistant", "yy"))
    assert learned(tokenizer, first_skipped) == learned(tokenizer, CONVERSATION)[1:]
    last_skipped = chat(("user", "ab"), ("assistant", "cd"), ("user", "x"), ("assistant", "yy", 0))
    [(ids, _)] = tokenize(tokenizer, [last_skipped], 512)
    assert "yy" not in tokenizer.decode(ids), "nothing after the last learned turn is kept"
    assert learned(tokenizer, last_skipped) == learned(tokenizer, chat(("user", "ab"), ("assistant", "cd")))


@pytest.mark.parametrize("template", [CHATML, None])
def test_truncation_keeps_the_last_turn(template: str | None) -> None:
    tokenizer = chat_tokenizer(template)
    [(full_ids, full_labels)] = tokenize(tokenizer, [CONVERSATION], 512)
    [(ids, labels)] = tokenize(tokenizer, [CONVERSATION], 20)
    assert (ids, labels) == (full_ids[-20:], full_labels[-20:])
    long_answer = chat(("user", "ab"), ("assistant", "z" * 30))
    [(ids, labels)] = tokenize(tokenizer, [long_answer], 10)
    assert tokenizer.decode(ids) == "z" * 10 and labels == ids, "an over-long answer keeps its start"


def test_a_template_that_is_not_prefix_stable_is_refused_naming_the_example() -> None:
    tokenizer = chat_tokenizer(CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n\n'"))
    with pytest.raises(ValueError, match=r"example 1: the chat template is not prefix-stable at message 1"):
        tokenize(tokenizer, [Example("a", "b"), chat(("user", "ab"), ("assistant", "cd"))], 512)
    # Earlier assistant turns rendered differently once later turns follow (like reasoning stripped).
    drops_history = CHATML.replace(
        "message['content']", "(message['content'] if loop.last or message['role'] != 'assistant' else '')"
    )
    with pytest.raises(ValueError, match=r"example 0: .*rendered differently once later messages follow"):
        tokenize(chat_tokenizer(drops_history), [CONVERSATION], 512)


def test_template_errors_become_value_errors_naming_the_example() -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}" + CHATML
    with pytest.raises(ValueError, match=r"example 0: the chat template refused the messages: user first"):
        tokenize(chat_tokenizer(strict), [CONVERSATION], 512)


def test_prompt_completion_examples_are_tokenized_as_before() -> None:
    tokenizer = chat_tokenizer(None)
    [(ids, labels)] = tokenize(tokenizer, [Example("ab=", "cd")], 64)
    assert tokenizer.decode(ids) == "<s>ab=cd</s>" and labels == [IGNORE_INDEX] * 4 + ids[4:]
    [(ids, labels)] = tokenize(tokenizer, [Example("abcdefgh=", "cd")], 5)
    assert tokenizer.decode(ids) == "h=cd</s>" and labels == [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]


# ---------------------------------------------------------------------- prompt and answer


def test_prompt_and_answer_of_a_prompt_completion_example() -> None:
    tokenizer = chat_tokenizer(None)
    example = Example("ab=", "cd")
    [(ids, labels)] = tokenize(tokenizer, [example], 64)
    prompt, answer = prompt_and_answer(tokenizer, example)
    assert (prompt, answer) == (ids[: labels.count(IGNORE_INDEX)], "cd")


@pytest.mark.parametrize("template", [CHATML, None])
def test_prompt_and_answer_of_a_chat_example_is_what_training_and_the_server_see(
    template: str | None, base_model_dir: Path
) -> None:
    tokenizer = chat_tokenizer(template)
    prompt, answer = prompt_and_answer(tokenizer, CONVERSATION)
    assert answer == "yy"
    [(ids, labels)] = tokenize(tokenizer, [CONVERSATION], 512)
    last_turn = max(i for i, label in enumerate(labels) if label == IGNORE_INDEX) + 1
    assert ids[:last_turn] == prompt, "trained to answer the prompt a request gets"

    served_tokenizer = chat_tokenizer(template)
    settings = ServerSettings(model=base_model_dir, max_model_len=512)
    service = CompletionService(settings, ReadyEngine(), ModelRegistry("base"), served_tokenizer)  # type: ignore[arg-type]
    request = ChatCompletionRequest(
        model="base", messages=[{"role": m.role, "content": m.content} for m in CONVERSATION.messages[:-1]]
    )
    assert service.prepare(request)[0] == [prompt]


def test_prompt_and_answer_on_the_embedded_model(base_model_dir: Path) -> None:
    """The embedded tokenizer has no chat template: both sides use DEFAULT_CHAT_TEMPLATE."""
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    prompt, _ = prompt_and_answer(tokenizer, CONVERSATION)
    service = CompletionService(
        ServerSettings(model=base_model_dir, max_model_len=512),
        ReadyEngine(),  # type: ignore[arg-type]
        ModelRegistry("base"),
        AutoTokenizer.from_pretrained(str(base_model_dir)),
    )
    request = ChatCompletionRequest(
        model="base", messages=[{"role": m.role, "content": m.content} for m in CONVERSATION.messages[:-1]]
    )
    assert service.prepare(request)[0] == [prompt]
    assert prompt[0] == tokenizer.bos_token_id


# --------------------------------------------------------------------------------- training


def test_training_on_chat_examples_lowers_the_loss() -> None:
    """Eight conversations, one batch: the loss has no sampling noise, so a steady drop is learning
    (0.9 as in test_loop.test_loss_drops: this random 2-layer model learns slowly)."""
    tokenizer = chat_tokenizer(CHATML)
    examples = [chat(("system", "copy"), ("user", c), ("assistant", c * 4)) for c in "abcdefgh"]
    hp = Hyperparameters(r=4, lora_alpha=8, steps=30, learning_rate=1e-2, batch_size=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the test machine's cores are shared
    try:
        result = train_task(make_model(len(tokenizer)), tokenizer, examples, resolve_method("lori-d"), hp, [])
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["final_loss"] < 0.9 * result.metrics["initial_loss"], result.metrics  # ~0.76


# --------------------------------------------------------------------------------- the API


MIXED = [
    {"prompt": "a", "completion": "b"},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "weight": 0},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "weight": 1},
        ]
    },
]


def test_both_shapes_are_accepted_and_converted() -> None:
    task = TaskCreate.model_validate({"name": "t", "examples": MIXED})
    assert [e.to_example() for e in task.examples] == [
        Example("a", "b"),
        chat(("user", "a"), ("assistant", "b")),
        chat(("system", "s"), ("user", "a"), ("assistant", "b", 0), ("user", "c"), ("assistant", "d")),
    ]


BAD = [
    ({"prompt": "x"}, "examples.1.completion", "Field required"),
    ({**MIXED[1], "prompt": "x"}, "examples.1.prompt", "Extra inputs"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "examples.1.messages.0.role", "'system', 'user' or"),
    ({"messages": [{"role": "user", "content": "a"}]}, "examples.1.messages", "end with an assistant"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "foo": 1}]},
        "examples.1.messages.1.foo",
        "Extra inputs",
    ),
    (
        {"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]},
        "examples.1.messages.0.weight",
        "only allowed on assistant",
    ),
    (
        {"messages": [{"role": "assistant", "content": "b", "weight": 2}]},
        "examples.1.messages.0.weight",
        "0 or 1",
    ),
    (
        {"messages": [{"role": "assistant", "content": "b", "weight": 0}]},
        "examples.1.messages",
        "nothing to learn",
    ),
    ({"messages": []}, "examples.1.messages", "at least 1"),
    ("text", "examples.1", "an example is an object"),
]


@pytest.mark.parametrize(("example", "path", "message"), BAD)
def test_bad_examples_name_the_field(example: object, path: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TaskCreate.model_validate({"name": "t", "examples": [MIXED[0], example]})
    first = caught.value.errors()[0]
    assert ".".join(str(part) for part in first["loc"]) == path
    assert message in first["msg"]


def test_bad_bodies_are_400s_naming_the_field(base_model_dir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = ServerSettings(model=base_model_dir, home=tmp_path)
    with TestClient(create_app(settings, start_engine=False)) as client:
        for example, path, _ in BAD:
            response = client.post("/tasks", json={"name": "t", "examples": [MIXED[0], example]})
            assert response.status_code == 400 and response.json()["error"]["param"] == path, response.text


def jsonl(*examples: object) -> bytes:
    return "".join(json.dumps(example) + "\n" for example in examples).encode()


def test_jsonl_takes_both_shapes() -> None:
    parsed = parse_jsonl(jsonl(*MIXED))
    as_routed = TaskCreate.model_validate(
        {"name": "t", "examples": [e.model_dump() for e in parsed]}
    )  # the router
    expected = TaskCreate.model_validate({"name": "t", "examples": MIXED})
    assert [e.to_example() for e in as_routed.examples] == [e.to_example() for e in expected.examples]


@pytest.mark.parametrize(("example", "path", "message"), BAD[:-1])
def test_jsonl_errors_name_the_line_and_the_field(example: object, path: str, message: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_jsonl(jsonl(MIXED[0], example))
    field = path.removeprefix("examples.1.")
    assert caught.value.param == "file"
    assert caught.value.message.startswith(f"file line 2: {field}: "), caught.value.message
    assert message in caught.value.message


# ------------------------------------------------------------------------------- job board


def test_the_job_board_round_trips_both_shapes(tmp_path: Path) -> None:
    board = JobBoard(tmp_path)
    examples = [e.to_example() for e in TaskCreate.model_validate({"name": "t", "examples": MIXED}).examples]
    job = board.create("t", "lori-s", {}, examples)
    assert board.examples(job.id) == examples
    assert job.n_examples == 3
