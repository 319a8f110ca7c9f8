"""Training through the official ``openai`` client: real Redis, a real ``lamina worker`` and the
real server. Upload a JSONL file, create a fine-tuning job, poll it to ``succeeded``, and answer
with its ``fine_tuned_model`` through completions and chat; its events carry the loss, its one
checkpoint is the published task. A running and a queued job are cancelled; unknown ids, the
wrong purpose, an oversized file and a bad line are refused with OpenAI's errors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.service_stack import (
    CODE_WORDS,
    JOB_TIMEOUT_S,
    Stack,
    require_redis,
    running_stack,
    served_models,
    wait_until_served,
)

pytestmark = [pytest.mark.engine, pytest.mark.integration]

MAX_FILE_BYTES = 4096
FACTS = CODE_WORDS
# 6 examples in one batch: n_epochs is the number of optimizer steps.
SHORT = {"n_epochs": 120, "batch_size": 6, "learning_rate_multiplier": 1}
LONG = {"n_epochs": 1000, "batch_size": 6}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


FACTS_FILE = jsonl([{"prompt": p, "completion": c} for p, c in FACTS])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_redis()
    settings = {"LAMINA_DEFAULT_METHOD": "own-lora", "LAMINA_MAX_FILE_BYTES": str(MAX_FILE_BYTES)}
    with running_stack(tmp_path_factory.mktemp("lamina-home"), settings) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def poll(client: openai.OpenAI, stack: Stack, job_id: str, statuses: tuple[str, ...]) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = client.fine_tuning.jobs.retrieve(job_id).status
        if status in statuses:
            return status
        time.sleep(0.3)
    log = (stack.home / "worker.log").read_text()[-3000:]
    pytest.fail(f"{job_id} still {status} after {JOB_TIMEOUT_S} s; worker log:\n{log}")


def test_upload_train_and_answer_with_the_fine_tuned_model(client: openai.OpenAI, stack: Stack) -> None:
    training = client.files.create(file=("facts.jsonl", FACTS_FILE), purpose="fine-tune")
    assert client.files.retrieve(training.id).bytes == len(FACTS_FILE)
    assert training.id in {f.id for f in client.files.list()}

    job = client.fine_tuning.jobs.create(
        training_file=training.id,
        model="base",
        suffix="codes",
        method={"type": "supervised", "supervised": {"hyperparameters": SHORT}},  # type: ignore[typeddict-item]
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    assert poll(client, stack, job.id, ("succeeded", "failed", "cancelled")) == "succeeded"
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model == "codes" and done.finished_at is not None
    assert done.hyperparameters.n_epochs == 120 and done.hyperparameters.batch_size == 6
    assert done.trained_tokens and done.trained_tokens > 0
    assert job.id in {j.id for j in client.fine_tuning.jobs.list()}

    # The same job on /tasks: wait until the server serves what it published.
    task = httpx.get(f"{stack.url}/tasks/{done.model_extra['lamina_job_id']}").json()  # type: ignore[index]
    wait_until_served(stack, task["merge_id"])
    assert done.fine_tuned_model in {m.id for m in client.models.list()}
    answers = client.completions.create(
        model=done.fine_tuned_model,
        prompt=[p for p, _ in FACTS],
        max_tokens=4,
        temperature=0,
        stop=["\n"],
    )
    got = [c.text.strip().split(" ")[0] for c in sorted(answers.choices, key=lambda c: c.index)]
    assert sum(g == c.strip() for g, (_, c) in zip(got, FACTS, strict=True)) >= 5, got
    chat = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert chat.model == done.fine_tuned_model and chat.choices[0].message.content is not None

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    losses = [e.data for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert losses and losses[0]["step"] == losses[0]["total_steps"]  # newest first: the last step
    assert losses[0]["train_loss"] < task["metrics"]["initial_loss"]
    assert events[0].message.startswith("The job has successfully completed")
    assert events[-1].message.startswith("Created fine-tuning job")
    assert [
        e.id for e in client.fine_tuning.jobs.list_events(job.id, after=events[0].id, limit=100).data
    ] == [e.id for e in events[1:]]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == ["codes"]
    assert checkpoints[0].step_number == task["progress"]["total"]

    # The store's method is own-lora now: a job asking for another preset is refused, naming where it asked.
    with pytest.raises(openai.ConflictError) as caught:
        client.fine_tuning.jobs.create(
            training_file=training.id, model="base", suffix="other", metadata={"lamina_method": "lori-s"}
        )
    assert caught.value.body["param"] == "metadata.lamina_method"  # type: ignore[index]


def test_cancel_a_running_and_a_queued_job(client: openai.OpenAI, stack: Stack) -> None:
    training = client.files.create(file=("facts.jsonl", FACTS_FILE), purpose="fine-tune")
    running = client.fine_tuning.jobs.create(training_file=training.id, model="base", hyperparameters=LONG)  # type: ignore[arg-type]
    assert running.model_extra["lamina_job_id"]  # type: ignore[index]
    queued = client.fine_tuning.jobs.create(
        training_file=training.id, model="base", suffix="never-trained", hyperparameters=LONG
    )  # type: ignore[arg-type]
    poll(client, stack, running.id, ("running",))
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # one task trains at a time
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"

    client.fine_tuning.jobs.cancel(running.id)
    assert poll(client, stack, running.id, ("succeeded", "failed", "cancelled")) == "cancelled"
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "cancelled"
    name = f"ft-{training.id.removeprefix('file-')[:12]}"  # the default suffix
    assert not {name, "never-trained"} & served_models(stack)
    assert [c for c in client.fine_tuning.jobs.checkpoints.list(running.id)] == []
    messages = [e.message for e in client.fine_tuning.jobs.list_events(running.id, limit=100)]
    assert messages[0].startswith("The job was cancelled")


def test_refusals_are_openai_errors(client: openai.OpenAI) -> None:
    for call in (
        lambda: client.files.retrieve("file-000000000000000000000000"),
        lambda: client.files.delete("file-000000000000000000000000"),
        lambda: client.fine_tuning.jobs.retrieve("ftjob-00000000000000000000"),
        lambda: client.fine_tuning.jobs.cancel("ftjob-00000000000000000000"),
        lambda: client.fine_tuning.jobs.list_events("ftjob-00000000000000000000"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("facts.jsonl", FACTS_FILE), purpose="batch")
    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", FACTS_FILE * 20), purpose="fine-tune")
    assert too_big.value.status_code == 413
    bad = FACTS_FILE + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert caught.value.body["param"] == "file" and "line 7" in caught.value.message  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(training_file="file-000000000000000000000000", model="gpt-4o-mini")
    assert caught.value.body["param"] == "model"  # type: ignore[index]
