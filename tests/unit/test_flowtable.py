"""The UDP flow table, driven by a fake clock: expiry, refresh, LRU eviction, deadlines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portproxy.flowtable import FlowLimits, FlowTable

A = ("10.0.0.1", 1001)
B = ("10.0.0.2", 1002)
C = ("10.0.0.3", 1003)
D = ("10.0.0.4", 1004)


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(idle: float = 30.0, max_flows: int = 100, clock: FakeClock | None = None):
    clock = clock or FakeClock()
    table: FlowTable[tuple[str, int], str] = FlowTable(FlowLimits(idle, max_flows), clock)
    return table, clock


# ---------------------------------------------------------------------------- limits


def test_limits_defaults_match_the_documented_udp_defaults() -> None:
    assert FlowLimits() == FlowLimits(idle_timeout=30.0, max_flows=10000)


@pytest.mark.parametrize(("idle", "flows"), [(-1.0, 1), (1.0, -1)])
def test_limits_reject_negative(idle: float, flows: int) -> None:
    with pytest.raises(ValueError):
        FlowLimits(idle, flows)


def test_limits_are_frozen() -> None:
    limits = FlowLimits()
    with pytest.raises(AttributeError):
        limits.max_flows = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------- basics


def test_add_get_remove_len_contains() -> None:
    table, _ = make()
    assert table.add(A, "flow-a") is None
    assert table.add(B, "flow-b") is None
    assert len(table) == 2
    assert A in table
    assert C not in table
    assert table.get(A) == "flow-a"
    assert table.get(C) is None
    assert table.remove(A) == "flow-a"
    assert table.remove(A) is None
    assert A not in table
    assert len(table) == 1
    assert (table.evictions, table.expirations) == (0, 0)


def test_add_existing_key_refused() -> None:
    table, _ = make()
    table.add(A, "first")
    with pytest.raises(ValueError):
        table.add(A, "second")
    assert table.get(A) == "first"
    assert len(table) == 1


def test_iteration_is_a_snapshot_in_recency_order() -> None:
    table, clock = make()
    for key in (A, B, C):
        table.add(key, str(key))
        clock.advance(1)
    table.get(A)
    assert list(table) == [B, C, A]
    assert table.items() == [(B, str(B)), (C, str(C)), (A, str(A))]
    for key in table:  # removing while iterating is allowed
        table.remove(key)
    assert len(table) == 0


def test_clear_returns_everything_oldest_first() -> None:
    table, clock = make()
    table.add(A, "a")
    clock.advance(1)
    table.add(B, "b")
    assert table.clear() == [(A, "a"), (B, "b")]
    assert len(table) == 0
    assert table.next_deadline() is None
    assert table.clear() == []


def test_peek_does_not_refresh() -> None:
    table, clock = make(idle=10)
    table.add(A, "a")
    clock.advance(9)
    assert table.peek(A) == "a"
    assert table.peek(B) is None
    clock.advance(1)
    assert table.expire() == [(A, "a")]


# ---------------------------------------------------------------------------- expiry


def test_flow_expires_exactly_at_idle_timeout() -> None:
    table, clock = make(idle=30)
    table.add(A, "a")
    clock.advance(29.999)
    assert table.expire() == []
    assert A in table
    clock.advance(0.001)
    assert table.expire() == [(A, "a")]
    assert A not in table
    assert table.expirations == 1
    assert table.evictions == 0


def test_expire_uses_explicit_now() -> None:
    table, _ = make(idle=5)
    table.add(A, "a")
    assert table.expire(now=1004.0) == []
    assert table.expire(now=1005.0) == [(A, "a")]


def test_expire_returns_only_the_idle_ones_oldest_first() -> None:
    table, clock = make(idle=10)
    table.add(A, "a")  # t=1000
    clock.advance(3)
    table.add(B, "b")  # t=1003
    clock.advance(3)
    table.add(C, "c")  # t=1006
    clock.advance(7)  # t=1013: A and B are 13 and 10 s idle, C 7 s
    assert table.expire() == [(A, "a"), (B, "b")]
    assert list(table) == [C]
    assert table.expirations == 2


def test_get_refreshes_client_direction() -> None:
    table, clock = make(idle=10)
    table.add(A, "a")
    clock.advance(8)
    assert table.get(A) == "a"
    clock.advance(8)  # 16 s since add, 8 s since the last datagram
    assert table.expire() == []
    assert table.last_active(A) == 1008.0
    clock.advance(2)
    assert table.expire() == [(A, "a")]


def test_touch_refreshes_reply_direction() -> None:
    table, clock = make(idle=10)
    table.add(A, "a")
    table.add(B, "b")
    clock.advance(8)
    assert table.touch(A) is True
    clock.advance(8)
    assert table.expire() == [(B, "b")]
    assert list(table) == [A]
    assert table.touch(C) is False
    assert table.last_active(C) is None


def test_idle_timeout_zero_never_expires() -> None:
    table, clock = make(idle=0)
    table.add(A, "a")
    clock.advance(10**9)
    assert table.expire() == []
    assert table.next_deadline() is None
    assert A in table


def test_expire_on_empty_table() -> None:
    table, _ = make()
    assert table.expire() == []


# ---------------------------------------------------------------------------- deadlines


def test_next_deadline_follows_the_oldest_flow() -> None:
    table, clock = make(idle=10)
    assert table.next_deadline() is None
    table.add(A, "a")  # t=1000
    assert table.next_deadline() == 1010.0
    clock.advance(4)
    table.add(B, "b")  # t=1004
    assert table.next_deadline() == 1010.0
    clock.advance(2)
    table.touch(A)  # t=1006: B is now the oldest
    assert table.next_deadline() == 1014.0
    table.remove(B)
    assert table.next_deadline() == 1016.0


def test_one_timer_drives_expiry() -> None:
    """Simulates the engine's single timer: fire at next_deadline, expire, re-arm."""
    table, clock = make(idle=10)
    table.add(A, "a")
    clock.advance(5)
    table.add(B, "b")
    closed: list[str] = []
    fires = 0
    deadline = table.next_deadline()
    while deadline is not None:
        assert fires < 10, "the timer must not spin"
        clock.now = deadline
        fires += 1
        closed += [flow for _, flow in table.expire()]
        if fires == 1:
            table.touch(B)  # refreshed B at t=1010 moves its deadline to 1020
        deadline = table.next_deadline()
    assert closed == ["a", "b"]
    assert clock.now == 1020.0
    assert fires == 2


# ---------------------------------------------------------------------------- eviction


def test_lru_eviction_order_and_counter() -> None:
    table, clock = make(idle=100, max_flows=3)
    for key in (A, B, C):
        table.add(key, str(key))
        clock.advance(1)
    table.get(A)  # A is now the most recent; B is least recently used
    assert table.add(D, "d") == (B, str(B))
    assert list(table) == [C, A, D]
    assert table.evictions == 1
    table.touch(C)  # replies count as use too: A is the LRU now
    assert table.add(B, "b2") == (A, str(A))
    assert list(table) == [D, C, B]
    assert (table.evictions, table.expirations) == (2, 0)
    assert len(table) == 3


def test_eviction_of_an_already_idle_flow_counts_as_expiry() -> None:
    table, clock = make(idle=10, max_flows=1)
    table.add(A, "a")
    clock.advance(10)  # A's deadline passed but the timer has not fired yet
    assert table.add(B, "b") == (A, "a")
    assert (table.evictions, table.expirations) == (0, 1)


def test_max_flows_zero_is_unlimited() -> None:
    table, _ = make(max_flows=0)
    for port in range(1000):
        assert table.add(("10.0.0.1", port), "f") is None
    assert len(table) == 1000
    assert table.evictions == 0


def test_remove_frees_a_slot_without_eviction() -> None:
    table, _ = make(max_flows=2)
    table.add(A, "a")
    table.add(B, "b")
    table.remove(A)
    assert table.add(C, "c") is None
    assert table.evictions == 0


# ---------------------------------------------------------------------------- model check

ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "get", "touch", "remove", "expire", "tick"]),
        st.integers(min_value=0, max_value=7),
    ),
    max_size=80,
)


@given(ops, st.integers(min_value=1, max_value=5), st.sampled_from([0.0, 3.0, 5.0]))
def test_matches_a_naive_model(operations, max_flows: int, idle: float) -> None:
    """Random operations against a list-based model of LRU + idle expiry."""
    clock = FakeClock(0.0)
    table: FlowTable[int, int] = FlowTable(FlowLimits(idle, max_flows), clock)
    model: dict[int, float] = {}  # key -> last activity; recency = sorted by (time, order)
    order: list[int] = []  # least recently active first

    def use(key: int) -> None:
        model[key] = clock.now
        order.remove(key)
        order.append(key)

    for op, key in operations:
        if op == "tick":
            clock.advance(key)
        elif op == "add":
            if key in model:
                with pytest.raises(ValueError):
                    table.add(key, key)
                continue
            victim = order[0] if len(order) >= max_flows else None
            removed = table.add(key, key)
            assert removed == (None if victim is None else (victim, victim))
            if victim is not None:
                order.pop(0)
                del model[victim]
            model[key] = clock.now
            order.append(key)
        elif op in ("get", "touch"):
            result = table.get(key) if op == "get" else table.touch(key)
            assert result == (
                (key if op == "get" else True) if key in model else (None if op == "get" else False)
            )
            if key in model:
                use(key)
        elif op == "remove":
            assert table.remove(key) == (key if key in model else None)
            if key in model:
                order.remove(key)
                del model[key]
        else:
            gone = [k for k in order if idle and model[k] + idle <= clock.now]
            assert table.expire() == [(k, k) for k in gone]
            for k in gone:
                order.remove(k)
                del model[k]
        assert list(table) == order
        assert len(table) <= max_flows
        expected_deadline = model[order[0]] + idle if (order and idle) else None
        assert table.next_deadline() == expected_deadline
