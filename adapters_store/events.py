"""Store events: a nudge to server replicas that the live merge changed, so they hot-swap.

The ledger is the truth; an event only says "look again". A lost event (Redis down, a
subscriber reconnecting) is harmless for a server that also runs a :class:`LedgerWatcher`,
and a server without Redis runs only the watcher.

Events go over Redis pub/sub on a channel derived from the store root, so stores sharing
one Redis never wake each other's servers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import redis

from adapters_store.store import AdapterStore

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "lamina:store:"


def channel_for(store_root: str | Path) -> str:
    """The pub/sub channel of a store. Local paths are resolved, so "./store" and its absolute
    path share one channel; URLs (``s3://...``) are used as written."""
    root = str(store_root)
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return CHANNEL_PREFIX + hashlib.sha256(root.encode()).hexdigest()[:16]


def publish_event(redis_url: str, store_root: str | Path, event: dict[str, Any]) -> int:
    """Publish ``event`` (JSON-serializable) for the store; returns how many subscribers got it."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.publish(channel_for(store_root), json.dumps(event)))
    finally:
        client.close()


def redis_notifier(redis_url: str, store_root: str | Path) -> Callable[[dict[str, Any]], None]:
    """An ``on_event`` callback for :class:`adapters_store.store.AdapterStore`."""

    def notify(event: dict[str, Any]) -> None:
        publish_event(redis_url, store_root, event)

    return notify


class EventSubscriber:
    """Subscribed from construction on, so no event published after it returns is missed.

    Use as a context manager; :meth:`get` for one event, :meth:`events` to loop until a stop
    event is set (run it in the server's own thread). Connection errors propagate: the caller
    decides whether to reconnect or fall back to the ledger watcher.
    """

    def __init__(self, redis_url: str, store_root: str | Path, confirm_timeout_s: float = 5.0) -> None:
        self.channel = channel_for(store_root)
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(self.channel)
        # Wait for Redis to confirm: until then a publish from another connection can be lost.
        confirm = self._pubsub.get_message(timeout=confirm_timeout_s)
        if confirm is None or confirm["type"] != "subscribe":
            self.close()
            raise TimeoutError(f"Redis did not confirm the subscription to {self.channel}")

    def get(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The next event, or None if none arrives within ``timeout`` seconds."""
        message = self._pubsub.get_message(timeout=timeout)
        if message is None or message["type"] != "message":
            return None
        try:
            event = json.loads(message["data"])
        except ValueError:
            log.warning("ignoring a malformed event on %s", self.channel)
            return None
        return event if isinstance(event, dict) else None

    def events(self, stop: threading.Event, poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
        while not stop.is_set():
            event = self.get(timeout=poll_s)
            if event is not None:
                yield event

    def close(self) -> None:
        self._pubsub.close()
        self._client.close()

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


EventsMode = Literal["redis", "polling"]


class EventFollower:
    """Follows a store's events from a thread for as long as the server runs, whether or not
    Redis is there: subscribed, each event calls ``on_event``; while Redis cannot be reached it
    retries every ``retry_s`` and the server relies on its ledger poll alone.

    :attr:`mode` says which of the two holds now (``/ready`` shows it), and each change of mode
    is logged once, not every retry.
    """

    def __init__(
        self, redis_url: str, store_root: str | Path, on_event: Callable[[], object], retry_s: float = 2.0
    ) -> None:
        self.redis_url, self.store_root = redis_url, store_root
        self.on_event = on_event
        self.retry_s = retry_s
        self.mode: EventsMode = "polling"
        self._warned = False

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run until ``stop`` is set, in a daemon thread (returned, for joining)."""
        thread = threading.Thread(target=self.run, args=(stop,), name="store-events", daemon=True)
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with EventSubscriber(self.redis_url, self.store_root) as subscriber:
                    self._set_mode("redis")
                    for _ in subscriber.events(stop, poll_s=0.5):
                        self.on_event()
            except Exception as error:  # Redis down or gone: the ledger poll still works
                self._set_mode("polling", error)
                stop.wait(self.retry_s)

    def _set_mode(self, mode: EventsMode, error: BaseException | None = None) -> None:
        if mode == "redis" and self.mode != "redis":
            log.info("following store events on Redis")
        elif mode == "polling" and (self.mode == "redis" or not self._warned):
            log.warning("store events unavailable (%s); following the ledger by polling", error)
            self._warned = True
        self.mode = mode


class LedgerWatcher:
    """Polls the store's ledger for servers without Redis (and as a safety net beside it): the
    file's size and mtime, or the last ``seq`` in the database (a replica that missed an event
    catches up from the ledger itself, wherever it is).

    The ledger is append-only, so any change of its stamp means a new entry. The state at
    construction counts as seen: load the live merge first, then start watching. A poll that
    cannot reach the ledger (the database restarting) reports no change and logs once; the
    next poll that can read it reports the change.
    """

    def __init__(self, store: AdapterStore, interval_s: float = 2.0) -> None:
        self.store = store
        self.interval_s = interval_s
        self._seen = self._stamp()
        self._failing = False

    def _stamp(self) -> object:
        return self.store.ledger_stamp()

    def poll(self) -> bool:
        """True once per change since the last call."""
        try:
            stamp = self._stamp()
        except Exception as error:
            if not self._failing:
                log.warning(
                    "cannot read the ledger of %s (%s); retrying at the next poll", self.store.location, error
                )
            self._failing = True
            return False
        self._failing = False
        changed = stamp != self._seen
        self._seen = stamp
        return changed

    def changes(self, stop: threading.Event) -> Iterator[None]:
        """Yield after each change, checking every ``interval_s`` until ``stop`` is set."""
        while not stop.wait(self.interval_s):
            if self.poll():
                yield None
