"""The server's router for ``continual``: which public name answers a request, from the live
tasks' prototypes as a sync hands them over, for completion prompts (text, texts, token ids) and
chat messages, in each LAMINA_CONTINUAL_ROUTING mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adapters_store.routing import PromptEmbedder, fit_prototype
from server.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.openai.routing import ContinualRouter, RoutingMode

CODES = [
    f"Code word for {w}:" for w in ("river", "apple", "stone", "cloud", "lamp", "horse", "glass", "paper")
]
GENERAL = [
    "The weather today is warm and",
    "Once upon a time there was a",
    "She opened the door and saw",
    "In the morning we went to the",
    "My favourite food is bread",
    "The history of the old city",
    "He said that the train was",
    "They walked along the river until",
]


@pytest.fixture(scope="module")
def metas(base_model_dir: Path) -> dict[str, dict]:
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    embedder = PromptEmbedder.from_model_dir(base_model_dir, tokenizer)
    prototype = fit_prototype(embedder.embed(CODES), embedder.embed(GENERAL))
    return {"codes": {"routing": prototype.to_dict()}}


def router(base_model_dir: Path, metas: dict[str, dict], mode: RoutingMode = "merge") -> ContinualRouter:
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    routed = ContinualRouter(mode, "base", base_model_dir, tokenizer)
    routed.follow(metas)
    return routed


def test_a_task_prompt_goes_to_the_merge_and_a_general_one_to_the_base(
    base_model_dir: Path, metas: dict[str, dict]
) -> None:
    routed = router(base_model_dir, metas)
    assert (
        routed.served_name(CompletionRequest(model="continual", prompt="Code word for tree:"), "continual")
        == "continual"
    )
    assert (
        routed.served_name(CompletionRequest(model="continual", prompt="The weather today is"), "continual")
        == "base"
    )


def test_other_names_are_never_rerouted(base_model_dir: Path, metas: dict[str, dict]) -> None:
    routed = router(base_model_dir, metas)
    for name in ("base", "codes"):
        assert routed.served_name(CompletionRequest(model=name, prompt="The weather today is"), name) == name


def test_chat_messages_route_on_their_user_turns(base_model_dir: Path, metas: dict[str, dict]) -> None:
    routed = router(base_model_dir, metas)
    task = ChatCompletionRequest(
        model="continual", messages=[{"role": "user", "content": "Code word for tree:"}]
    )
    general = ChatCompletionRequest(
        model="continual",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Once upon a time there was"}]}],
    )
    assert routed.served_name(task, "continual") == "continual"
    assert routed.served_name(general, "continual") == "base"


def test_token_id_prompts_route_like_their_text(base_model_dir: Path, metas: dict[str, dict]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    ids = tokenizer("Code word for tree:", add_special_tokens=False)["input_ids"]
    routed = router(base_model_dir, metas)
    assert routed.served_name(CompletionRequest(model="continual", prompt=ids), "continual") == "continual"
    assert routed.served_name(CompletionRequest(model="continual", prompt=[ids]), "continual") == "continual"


def test_task_mode_names_the_task_and_off_mode_keeps_the_merge(
    base_model_dir: Path, metas: dict[str, dict]
) -> None:
    task_prompt = CompletionRequest(model="continual", prompt="Code word for tree:")
    general = CompletionRequest(model="continual", prompt="The weather today is")
    assert router(base_model_dir, metas, "task").served_name(task_prompt, "continual") == "codes"
    assert router(base_model_dir, metas, "task").served_name(general, "continual") == "base"
    assert router(base_model_dir, metas, "off").served_name(general, "continual") == "continual"


def test_no_live_task_leaves_continual_as_it_is(base_model_dir: Path) -> None:
    routed = router(base_model_dir, {})
    assert routed.served_name(CompletionRequest(model="continual", prompt="x"), "continual") == "continual"


def test_a_task_for_every_prompt_takes_them_to_the_merge_in_every_mode(base_model_dir: Path) -> None:
    metas = {"style": {"routing": {"signal": "embedding-mean-v1", "applies_to": "all", "threshold": 1.0,
                                   "centroid": [0.0], "center": [0.0]}}}  # fmt: skip
    general = CompletionRequest(model="continual", prompt="The weather today is")
    for mode in ("merge", "task"):
        assert router(base_model_dir, metas, mode).served_name(general, "continual") == "continual"


def test_a_dense_merge_keeps_task_prompts_on_the_merge(base_model_dir: Path, metas: dict[str, dict]) -> None:
    """With a dense (magnitude) merge live, a task's model is only a truncated SVD: its prompts go
    to the merge, which is served exactly; general prompts still go to the base."""
    routed = router(base_model_dir, metas, "task")
    routed.follow(metas, tasks_exact=False)
    assert (
        routed.served_name(CompletionRequest(model="continual", prompt="Code word for tree:"), "continual")
        == "continual"
    )
    assert (
        routed.served_name(CompletionRequest(model="continual", prompt="The weather today is"), "continual")
        == "base"
    )
