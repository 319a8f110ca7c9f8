"""The router of ``continual``: the threshold's calibration against hand-worked cases, the decision
on a learned task's prompt and on base-sampled text with the embedded model, and the prototypes'
round trip through a version's meta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters_store.routing import (
    MERGE,
    PromptEmbedder,
    RoutePrototype,
    Router,
    calibrate_threshold,
    destination,
    fit_prototype,
    router_from_metas,
    routing_text,
)
from bench.routes.run import frame_case
from trainer.config import ChatExample, ChatMessage, Example
from trainer.loop import load_base
from trainer.routing import example_text, fit_task_prototype, sample_general_texts
from trainer.suite import get_task


def test_separable_scores_cut_at_the_middle_of_the_gap() -> None:
    assert calibrate_threshold(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.4])) == pytest.approx(0.6)


def test_overlapping_scores_cut_where_fewest_shares_are_wrong() -> None:
    # positives 0.3 0.5 0.7 0.9, negatives 0.1 0.2 0.6: a cut at 0.7 misses 2/4 and routes 0/3 (0.5);
    # a cut at 0.3 misses 0/4 and routes 1/3 (0.33): the best.
    positives, negatives = torch.tensor([0.9, 0.3, 0.7, 0.5]), torch.tensor([0.6, 0.1, 0.2])
    assert calibrate_threshold(positives, negatives) == pytest.approx(0.3)


def test_no_general_text_keeps_every_task_prompt() -> None:
    assert calibrate_threshold(torch.tensor([0.5, 0.7]), torch.tensor([])) < 0.5


def test_the_nearest_task_wins_and_the_rest_goes_to_the_base() -> None:
    general = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    east, west = torch.zeros(8), torch.zeros(8)
    east[0], west[1] = 5.0, 5.0
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 0.3
    router = Router(
        {"east": fit_prototype(east + noise, general), "west": fit_prototype(west + noise, general)}
    )
    decisions = router.decide(torch.stack([east, west, general.mean(0) + 0.01]))
    assert [d.task for d in decisions] == ["east", "west", None]
    assert decisions[0].margin > 0 > decisions[2].margin


def test_a_prompt_both_tasks_accept_goes_to_the_nearer_not_the_broader() -> None:
    # Hand-built prototypes in 2-D (centre 0): "broad" accepts anything within 60 degrees of the
    # x axis (threshold 0.5), "narrow" within 18 degrees of a direction 30 degrees off it (0.95).
    # A prompt at 30 degrees is the narrow task's own (cosine 1.0, margin 0.05) and still the broad
    # task's (cosine 0.87, margin 0.37): the nearer centroid must win, not the larger margin.
    center = torch.zeros(2)
    angle = torch.tensor(torch.pi / 6)
    broad = RoutePrototype(torch.tensor([1.0, 0.0]), center, threshold=0.5)
    narrow = RoutePrototype(torch.stack([angle.cos(), angle.sin()]), center, threshold=0.95)
    decisions = Router({"broad": broad, "narrow": narrow}).decide(
        torch.stack([torch.stack([angle.cos(), angle.sin()]), torch.tensor([1.0, -0.2])])
    )
    assert [d.task for d in decisions] == ["narrow", "broad"]
    assert decisions[0].margin == pytest.approx(0.05, abs=1e-4)  # the chosen task's own margin


def test_a_task_for_every_prompt_takes_them_all() -> None:
    general = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    style = fit_prototype(torch.ones(5, 4), general, applies_to="all")
    assert Router({"style": style}).to_merge(general) == [True] * 32
    assert Router({}).to_merge(general) == [False] * 32


def test_beside_a_task_for_every_prompt_a_tasks_own_prompts_still_go_to_it() -> None:
    """A style takes every prompt no other task matches (the merge, instead of the base); a
    learned task's prompts keep going to that task's model, under task and merge routing alike."""
    general = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    east = torch.zeros(8)
    east[0] = 5.0
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 0.3
    style = fit_prototype(torch.ones(5, 8), general, applies_to="all")
    router = Router({"east": fit_prototype(east + noise, general), "style": style})
    on_task, elsewhere = router.decide(torch.stack([east, general.mean(0) + 0.01]))
    assert (on_task.task, on_task.everything) == ("east", False)
    assert (elsewhere.task, elsewhere.everything) == ("style", True)
    assert [destination(d, "task") for d in (on_task, elsewhere)] == ["east", MERGE]
    assert [destination(d, "merge") for d in (on_task, elsewhere)] == [MERGE, MERGE]


def test_tasks_without_a_prototype_keep_the_merge_for_everything() -> None:
    """A store trained before routing: its tasks were served by the merge for every prompt."""
    router = router_from_metas({"old": {"method": "inflora"}})
    assert router.to_merge(torch.randn(3, 4)) == [True] * 3


def test_prototype_round_trips_through_json() -> None:
    general = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    proto = fit_prototype(torch.randn(10, 6, generator=torch.Generator().manual_seed(2)) + 3, general)
    again = RoutePrototype.from_dict(json.loads(json.dumps(proto.to_dict())))
    vectors = torch.randn(5, 6)
    assert torch.allclose(again.score(vectors), proto.score(vectors), atol=1e-5)
    assert again.threshold == pytest.approx(proto.threshold, abs=1e-6)


def test_routing_text_reads_system_and_user_turns_only() -> None:
    turns = [
        ("system", "Be brief."),
        ("user", "Code word for river?"),
        ("assistant", "lamp"),
        ("user", "and sea?"),
    ]
    assert routing_text(messages=turns) == "Be brief.\nCode word for river?\nand sea?"
    chat = ChatExample(
        messages=(ChatMessage("user", "Code word for river?"), ChatMessage("assistant", "lamp"))
    )
    assert example_text(chat) == "Code word for river?"
    assert example_text(Example("Code word for river:", " lamp")) == "Code word for river:"


@pytest.fixture(scope="module")
def tiny(base_model_dir: Path) -> tuple[object, object]:
    return load_base(base_model_dir)


def test_embedded_model_routes_task_prompts_to_the_merge_and_sampled_text_to_the_base(
    tiny: tuple[object, object], base_model_dir: Path
) -> None:
    """Two suite tasks' unseen test prompts go to their own task; text the base samples with
    another seed than the calibration's goes to the base (at most 1 in 50 strays)."""
    model, tokenizer = tiny
    prototypes = {}
    tests = {}
    for name in ("antonym", "add"):
        train, test = get_task(name).split(seed=0, n_train=100, n_test=30)
        prototypes[name] = fit_task_prototype(model, tokenizer, train, "tiny")  # type: ignore[arg-type]
        tests[name] = [example_text(e) for e in test]
    router = Router(prototypes)
    embedder = PromptEmbedder.from_model_dir(base_model_dir, tokenizer)  # type: ignore[arg-type]
    for name, texts in tests.items():
        assert [d.task for d in router.decide(embedder.embed(texts))] == [name] * len(texts)
    general = sample_general_texts(model, tokenizer, n=100, seed=99)  # type: ignore[arg-type]
    assert sum(router.to_merge(embedder.embed(general))) <= 2


def test_a_frame_the_task_shares_with_ordinary_questions_is_not_the_task(tiny: tuple[object, object]) -> None:
    """A task whose prompts share a question frame ("What is the name of Anna's cat?", the
    benchmark's pets case): calibrated against base-sampled text alone, its threshold let ordinary
    questions of the same shape through to the task; with ordinary chat requests on the general
    side they go to the base, requests it was not calibrated on included, while the task's unseen
    prompts still reach it."""
    model, tokenizer = tiny
    before = frame_case(model, tokenizer, "tiny", None, with_requests=False)
    after = frame_case(model, tokenizer, "tiny", None, with_requests=True)
    general_before, general_after = before["chat_requests_to_pets"], after["chat_requests_to_pets"]
    assert general_before >= 3, "the case this guards against: the frame alone passed for the task"
    assert general_after < general_before and general_after <= 1
    assert after["unseen_pets_prompts_to_pets"] == after["unseen_pets_prompts"]
