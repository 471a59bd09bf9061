"""``server.exchange.Exchange``: messages pushed now or a window at a time, replies pulled
later, against a grid that keeps pushed messages and their replies by id, as Flower's does."""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, RecordDict

from server import exchange
from server.exchange import Exchange, interleave


class Grid:
    """Flower's Grid contract as ``Exchange`` uses it: ``push_messages`` returns ids,
    ``pull_messages(ids)`` returns the replies that have come for them."""

    def __init__(self):
        self.sent: dict[str, Message] = {}
        self.ready: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for m in messages:
            ids.append(f"m{len(self.sent)}")
            self.sent[ids[-1]] = m
        return ids

    def pull_messages(self, ids):
        return [self.ready.pop(i) for i in ids if i in self.ready]

    def answer(self, mid: str) -> Message:
        reply = Message(RecordDict(), reply_to=self.sent[mid])
        reply.metadata.__dict__["_reply_to_message_id"] = mid  # as Flower sets it (no setter)
        self.ready[mid] = reply
        return reply


def _messages(nodes, built: list | None = None):
    for n in nodes:
        if built is not None:
            built.append(n)
        yield Message(RecordDict(), dst_node_id=n, message_type="train", group_id="1")


@pytest.fixture(autouse=True)
def _identity(task_identity):
    yield


def test_replies_that_came_while_the_caller_worked_are_collected_after_the_timeout():
    """Internal validation is pushed, external validation runs, then internal replies are
    pulled: a reply that arrived meanwhile is collected even though the exchange's timeout
    has passed by then; one that never came is missing (and said so)."""
    grid = Grid()
    exchange = Exchange(grid, _messages([1, 2]), timeout=0.05)
    assert set(grid.sent) == {"m0", "m1"}  # pushed at once, before any pull
    reply = grid.answer("m0")
    time.sleep(0.1)  # the caller worked past the exchange's deadline
    assert list(exchange.replies()) == [reply]
    assert exchange.pending == ["m1"]


class Answering(Grid):
    """Every node answers as soon as its message is pushed."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for mid in ids:
            self.answer(mid)
        return ids


def test_a_window_sends_the_next_message_as_each_reply_comes():
    """max-in-flight 2 over 5 sites (each answering at once): two messages out, each built
    only when it is sent; every reply lets exactly one more out; all five answered."""
    grid, built = Answering(), []
    exchange = Exchange(grid, _messages([1, 2, 3, 4, 5], built), timeout=30, window=2)
    assert list(grid.sent) == ["m0", "m1"] and built == [1, 2]
    got = []
    for reply in exchange.replies():
        got.append(reply.metadata.reply_to_message_id)
        assert len(grid.sent) - len(got) <= 2  # never more than the window out
    assert sorted(got) == ["m0", "m1", "m2", "m3", "m4"] and built == [1, 2, 3, 4, 5]
    assert exchange.unsent == 0
    # Each reply traces back to the message it answers, by its place in the sequence.
    assert {mid: exchange.order[mid] for mid in got} == {f"m{k}": k for k in range(5)}


def test_each_message_of_a_window_goes_out_as_soon_as_it_is_built():
    """A window's messages each carry a model built from its file for them: the first is
    pushed before the second is built, so its node need not wait for the others' models."""
    grid = Grid()
    pushed_when_built = []

    def messages():
        for n in (1, 2, 3):
            pushed_when_built.append(len(grid.sent))
            yield Message(RecordDict(), dst_node_id=n, message_type="train", group_id="1")

    exchange = Exchange(grid, messages(), timeout=30, window=3)
    assert pushed_when_built == [0, 1, 2]
    assert exchange.order == {"m0": 0, "m1": 1, "m2": 2} and exchange.pending == ["m0", "m1",
                                                                                   "m2"]


def test_a_window_still_full_at_the_timeout_leaves_the_rest_unsent():
    grid = Grid()
    exchange = Exchange(grid, _messages([1, 2, 3]), timeout=0.01, window=1)
    time.sleep(0.05)
    assert list(exchange.replies()) == []
    assert list(grid.sent) == ["m0"] and exchange.unsent == 2


def test_interleaved_phases_each_move_on_as_their_own_replies_come():
    """Internal validation and scoring, a window of 1 each: their replies alternate, so
    neither phase waits for the other to finish before its next message goes out."""
    grid = Answering()
    internal = Exchange(grid, _messages([1, 2, 3]), timeout=30, window=1)
    scoring = Exchange(grid, _messages([4, 5, 6]), timeout=30, window=1)
    got = [i for i, _ in interleave([internal, scoring])]
    assert got == [0, 1, 0, 1, 0, 1]
    assert internal.answered and scoring.answered and internal.unsent == scoring.unsent == 0


def test_an_expired_phase_stops_while_the_other_goes_on():
    grid = Answering()
    stuck = Exchange(Grid(), _messages([1, 2]), timeout=0.01, window=1)  # nobody answers
    time.sleep(0.05)
    moving = Exchange(grid, _messages([3, 4, 5]), timeout=30, window=1)
    got = [i for i, _ in interleave([stuck, moving])]
    assert got == [1, 1, 1] and stuck.unsent == 1 and len(stuck.pending) == 1


def test_poll_wait_pulls_a_reply_at_most_a_twentieth_of_its_wait_late_and_bounds_the_rate():
    """Brute force over arrival times: polling by ``poll_wait`` from the start, a reply
    that comes at T is pulled by T + max(0.05 s, T / 20) (1 s at most), and with many
    messages pending the pulls stay under PULLS_PER_SECOND."""
    for pending in (1, 3, 40, 500):
        polls, now = [], 0.0
        while now < 120:
            polls.append(now)
            now += exchange.poll_wait(now, pending)
        for arrival in [k * 0.013 for k in range(1, 9000)]:
            pulled = next(t for t in polls if t >= arrival)
            bound = min(exchange.MAX_POLL_SECONDS,
                        max(exchange.MIN_POLL_SECONDS, arrival * exchange.POLL_FRACTION,
                            pending / exchange.PULLS_PER_SECOND))
            assert pulled - arrival <= bound + 1e-9, (pending, arrival)
        rate = max(sum(1 for t in polls if a <= t < a + 1) for a in range(119)) * pending
        assert rate <= exchange.PULLS_PER_SECOND + pending  # one poll's requests of slack


class Clock:
    """A simulated clock for ``server.exchange`` (its ``time.monotonic`` and ``sleep``)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Later(Grid):
    """Each node answers ``after[node]`` simulated seconds after its message was pushed;
    counts every pull request."""

    def __init__(self, clock: Clock, after: dict[int, float]):
        super().__init__()
        self.clock, self.after, self.due, self.pulls = clock, after, {}, 0

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for mid in ids:
            self.due[mid] = self.clock.now + self.after[self.sent[mid].metadata.dst_node_id]
        return ids

    def pull_messages(self, ids):
        self.pulls += len(ids)
        for mid in ids:
            if self.clock.now >= self.due[mid] and mid not in self.ready:
                self.answer(mid)
                self.due[mid] = float("inf")
        return super().pull_messages(ids)


def test_interleave_pulls_each_reply_soon_after_it_comes(monkeypatch):
    """Sites answering 0.3 s, 2 s and 9 s after the push (a held-out node, a fast and a slow
    training site): each reply is pulled within a twentieth of the time since the one before
    it (0.05 s at least), with far fewer requests than a fixed 0.05-s poll would make."""
    clock = Clock()
    monkeypatch.setattr(exchange.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(exchange.time, "sleep", clock.sleep)
    grid = Later(clock, {1: 0.3, 2: 2.0, 3: 9.0})
    pulled = {}
    for reply in Exchange(grid, _messages([1, 2, 3]), timeout=60).replies():
        pulled[reply.metadata.reply_to_message_id] = clock.now
    assert sorted(pulled) == ["m0", "m1", "m2"]
    previous = 0.0
    for mid, came in (("m0", 0.3), ("m1", 2.0), ("m2", 9.0)):
        assert came <= pulled[mid] <= came + max(0.05, 0.05 * (came - previous)) + 1e-9, mid
        previous = pulled[mid]
    assert grid.pulls < 9.0 / 0.05
