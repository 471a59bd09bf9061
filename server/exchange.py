"""Send messages to nodes and hand back their replies one at a time, as they arrive.

Flower's ``Grid.send_and_receive`` returns a phase's replies together, so a server that
uses it holds every site's model at once (memory grows with sites x model), and it sleeps
3 s between pulls. ``stream_replies`` is built on the same Grid primitives
(``push_messages`` / ``pull_messages``) but pulls one reply per call and yields it, so the
caller can fold each model into its running state and drop it before the next is pulled.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger("flwr")

# When to pull again (``poll_wait``): a twentieth of the time waited so far, between 0.05 s
# and 1 s, and never more than PULLS_PER_SECOND requests a second.
POLL_FRACTION = 0.05
MIN_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 1.0
PULLS_PER_SECOND = 100.0


def poll_wait(waited: float, pending: int) -> float:
    """Seconds to sleep before the next pull, ``waited`` seconds after the last reply came
    (or the exchange began), with ``pending`` messages to pull (one request each).

    A reply is then pulled at most ``POLL_FRACTION`` of its wait late (0.05 s at least, 1 s at
    most), and that is how long its site idles before its next message, in every exchange
    of a run. The backoff it replaces (0.25 s doubling to 1 s) left most replies of a short
    run 0.3-0.9 s unpulled (a trace of each reply's ``created_at`` against its pull) while
    a round takes a few seconds (``benchmarks/peers.py`` prints per-round and fixed cost).
    A poll is one request per pending message to the SuperLink, hence the rate bound."""
    return min(MAX_POLL_SECONDS, max(MIN_POLL_SECONDS, POLL_FRACTION * waited,
                                     pending / PULLS_PER_SECOND))


class Exchange:
    """Messages pushed now, their replies pulled later (``replies``, or ``interleave`` for
    several): two phases that talk to disjoint nodes (internal validation at the training
    sites, scoring at the held-out ones) run at the same time instead of one after the other.

    ``window`` (run config ``max-in-flight``) bounds how many are out at once: the first
    ``window`` are pushed now and one more each time a reply is pulled, so ``messages`` may
    be a generator that builds each (model-sized) message only when it is sent. 0: all at
    once."""

    def __init__(self, grid: Grid, messages: Iterable[Message], timeout: float, *,
                 window: int = 0) -> None:
        self.grid, self.window = grid, window
        self._queue: Iterator[Message] = iter(messages)
        self.pending: list[str] = []
        self.order: dict[str, int] = {}  # message id -> its place in ``messages``
        self.unsent = 0
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._push(window or None)

    def _push(self, count: int | None) -> None:
        """Push the next ``count`` messages (all: None), each as soon as it is built: a
        message may carry a model built from its file for it, and its node need not wait
        for the window's other models to be built too."""
        for message in itertools.islice(self._queue, count):
            for mid in self.grid.push_messages([message]):
                self.order[mid] = len(self.order)
                self.pending.append(mid)

    @property
    def answered(self) -> bool:
        return not self.pending

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def _pull(self) -> Iterator[Message]:
        """One pull for every pending message: each reply as it is pulled (one id per pull:
        one model in memory), each letting the next message out within the window."""
        for mid in list(self.pending):
            for reply in self.grid.pull_messages([mid]):
                if reply.metadata.reply_to_message_id in self.pending:
                    self.pending.remove(reply.metadata.reply_to_message_id)
                if self.window and not self.expired:
                    self._push(1)  # the next message takes this one's place
                yield reply

    def _close(self) -> None:
        self.unsent = sum(1 for _ in self._queue)  # a window still full at the deadline
        if self.pending or self.unsent:
            log.warning("%d message(s) unanswered after %.0f s%s", len(self.pending),
                        self.timeout, f", {self.unsent} never sent" if self.unsent else "")

    def replies(self) -> Iterator[Message]:
        """Each reply as soon as it is pulled, until all have answered or the timeout (from
        the push) has passed; messages unanswered then are simply missing, as with
        ``send_and_receive``."""
        for _, reply in interleave([self]):
            yield reply


def interleave(exchanges: list[Exchange]) -> Iterator[tuple[int, Message]]:
    """The replies of several exchanges as they come, each with its exchange's place in
    ``exchanges``: phases that run at the same time are served together, so neither's
    window waits for the other to finish. The caller may append an exchange while it
    iterates (a phase that follows one of them). Each exchange is pulled at least once
    (replies may have come in while the caller worked), then until it is answered or
    expired."""
    live = list(range(len(exchanges)))
    seen = len(exchanges)
    since = time.monotonic()  # the last reply, or the start
    while live:
        for i in list(live):
            for reply in exchanges[i]._pull():
                since = time.monotonic()
                yield i, reply
            if exchanges[i].answered or exchanges[i].expired:
                live.remove(i)
                exchanges[i]._close()
            if len(exchanges) > seen:  # appended by the caller
                live += range(seen, len(exchanges))
                seen = len(exchanges)
        if not live:
            break
        now = time.monotonic()
        wait = poll_wait(now - since, sum(len(exchanges[i].pending) for i in live))
        first_deadline = min(exchanges[i].deadline for i in live)
        time.sleep(min(wait, max(first_deadline - now, 0)))


def stream_replies(grid: Grid, messages: Iterable[Message], timeout: float, *,
                   window: int = 0) -> Iterator[Message]:
    """Push ``messages`` (at the first ``next``; ``window`` at a time, see ``Exchange``);
    yield each reply as soon as it is pulled, until all have answered or ``timeout`` seconds
    have passed (messages still unanswered then are simply missing from what was yielded, as
    with ``send_and_receive``)."""
    exchange = Exchange(grid, messages, timeout, window=window)
    del messages
    yield from exchange.replies()


def send(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """All replies of a phase whose replies are small (queries, statistics)."""
    return list(stream_replies(grid, messages, timeout))


def failure_reason(reply: Message) -> str:
    """The one line an operator reads for an error reply. Flower's reply for a node whose
    heartbeat stopped (``NODE_UNAVAILABLE``) becomes "disconnected" with the time the
    SuperLink gave up on it, not a timeout (a killed node is known gone long before
    ``round-timeout``)."""
    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
        return ("disconnected: the node stopped sending heartbeats (the SuperLink gave it up "
                f"at {time.strftime('%H:%M:%S', time.gmtime())} UTC)")
    return reply.error.reason
