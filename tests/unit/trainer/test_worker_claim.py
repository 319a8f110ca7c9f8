"""What keeps a worker's job its own while it trains (trainer/worker.py): the heartbeat renews
the claim on a real job board and extends the store lock, and says so once the claim is gone;
the store turn lets one worker at a time train a store, with a file lock or a lock in the real
Redis at 127.0.0.1:6379."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from trainer import worker
from trainer.config import Example, TrainingExample
from trainer.contract.board import JobBoard
from trainer.contract.jobs import Job, JobStatus
from trainer.contract.settings import LaminaSettings

REDIS_URL = "redis://127.0.0.1:6379/0"
LEASE_S = 0.9  # the heartbeat beats every third of it
EXAMPLES: list[TrainingExample] = [Example("Sky:", " blue")]


def claimed(board: JobBoard, name: str = "colours", who: str = "w1") -> Job:
    board.create(name, "lori-d", {"steps": 1}, EXAMPLES)
    job = board.claim_next(who, LEASE_S)
    assert job is not None
    return job


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


class Beats:
    """The store lock's ``keep_lock``: counts its calls, optionally failing as Redis away does."""

    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self) -> None:
        self.calls += 1
        if self.fail:
            raise redis.exceptions.ConnectionError("Redis is away")


def test_the_heartbeat_holds_the_claim_past_its_lease_and_it_lapses_once_it_stops(tmp_path: Path) -> None:
    board = JobBoard(tmp_path)
    job = claimed(board)
    beats = Beats()
    with worker.heartbeat(board, job.id, "w1", LEASE_S, beats) as claim_held:
        time.sleep(3 * LEASE_S)  # a step far longer than the lease
        assert claim_held()
        assert board.current(job.id).status == JobStatus.validating
        assert board.current(job.id).lease_expires_at > time.time()  # type: ignore[operator]
    assert beats.calls >= 6  # every third of the lease: the store lock is kept as long
    calls_at_exit = beats.calls
    time.sleep(1.5 * LEASE_S)
    assert beats.calls == calls_at_exit, "the heartbeat went on after its block"
    lapsed = board.current(job.id)
    assert (
        lapsed.status == JobStatus.failed and lapsed.error is not None and lapsed.error.code == "worker_lost"
    )


def test_a_claim_the_board_took_back_turns_the_check_false(tmp_path: Path) -> None:
    board = JobBoard(tmp_path)
    job = claimed(board)
    with worker.heartbeat(board, job.id, "w1", LEASE_S, Beats()) as claim_held:
        assert claim_held()
        board.update(job.id, status=JobStatus.failed)  # as a replica that saw it lapse would
        assert eventually(lambda: not claim_held(), timeout_s=2 * LEASE_S)
    assert board.get(job.id).status == JobStatus.failed  # the heartbeat wrote nothing back


def test_another_workers_claim_is_never_renewed(tmp_path: Path) -> None:
    board = JobBoard(tmp_path)
    job = claimed(board, who="w1")
    expires = board.get(job.id).lease_expires_at
    with worker.heartbeat(board, job.id, "w2", LEASE_S, Beats()) as claim_held:
        assert eventually(lambda: not claim_held(), timeout_s=2 * LEASE_S)
    assert board.get(job.id).lease_expires_at == expires


def test_a_store_lock_that_cannot_be_extended_does_not_stop_the_heartbeat(tmp_path: Path) -> None:
    board = JobBoard(tmp_path)
    job = claimed(board)
    beats = Beats(fail=True)
    with worker.heartbeat(board, job.id, "w1", LEASE_S, beats) as claim_held:
        time.sleep(2.5 * LEASE_S)
        assert claim_held() and beats.calls >= 3
        assert board.current(job.id).status == JobStatus.validating  # the board's lease still holds


def second_turn_waits(settings: LaminaSettings) -> None:
    """Hold one turn; a second on the same store must wait until the first is over."""
    entered = threading.Event()

    def second() -> None:
        with worker.store_turn(settings):
            entered.set()

    with worker.store_turn(settings) as keep_lock:
        keep_lock()
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        assert not entered.wait(0.5), "two workers held the store's turn at once"
    assert entered.wait(5), "the turn was never released"
    thread.join(5)


def test_without_redis_the_turn_is_a_file_lock_one_worker_at_a_time(tmp_path: Path) -> None:
    settings = LaminaSettings(home=tmp_path)
    assert settings.events_url is None
    second_turn_waits(settings)
    assert (settings.store_dir / ".train.lock").exists()


@pytest.fixture
def redis_settings(tmp_path: Path) -> LaminaSettings:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError:
        pytest.fail(f"Redis is required at {REDIS_URL}")
    # a store path of its own, so no other run's lock is this one
    return LaminaSettings(home=tmp_path / uuid.uuid4().hex, redis_url=REDIS_URL, job_lease_s=5)


def lock_key(settings: LaminaSettings) -> str:
    return f"lamina:train-lock:{settings.store_dir.resolve()}"


def test_with_redis_the_turn_is_a_redis_lock_one_worker_at_a_time(redis_settings: LaminaSettings) -> None:
    second_turn_waits(redis_settings)
    assert not redis.Redis.from_url(REDIS_URL).exists(lock_key(redis_settings)), "the lock was left behind"


def test_keeping_the_redis_lock_renews_its_ttl_to_the_lease(redis_settings: LaminaSettings) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    with worker.store_turn(redis_settings) as keep_lock:
        time.sleep(1.2)
        assert client.pttl(lock_key(redis_settings)) < 4000
        keep_lock()
        assert client.pttl(lock_key(redis_settings)) > 4500  # the whole lease again


def test_a_redis_lock_gone_before_its_release_ends_the_turn_quietly(
    redis_settings: LaminaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with worker.store_turn(redis_settings):
        redis.Redis.from_url(REDIS_URL).delete(lock_key(redis_settings))  # expired, or Redis restarted
    assert "training lock expired" in caplog.text


def test_progress_keeps_a_bounded_loss_curve_that_spans_the_whole_run(tmp_path: Path) -> None:
    board = JobBoard(tmp_path)
    job = claimed(board)
    report = worker._progress_reporter(board, job.id, "w1")
    for step in range(1, 1001):
        report(step, 1000, 10.0 / step)
    curve = board.get(job.id).loss_curve
    assert len(curve) <= worker.LOSS_CURVE_POINTS
    assert curve[0] == (1, 10.0) and curve[-1] == (1000, 0.01)
    assert [s for s, _ in curve] == sorted(s for s, _ in curve)
    gaps = {b - a for (a, _), (b, _) in zip(curve[:-2], curve[1:-1], strict=True)}
    assert len(gaps) == 1, "points thinned unevenly"
