"""Balancing policies and passive health (portproxy.endpoints), with injected rng and clock."""

from __future__ import annotations

import pytest

from portproxy.endpoints import BalancePolicy, Balancer, Endpoint, EndpointSet, PassiveHealth
from portproxy.resolve.static import StaticResolver
from portproxy.spec import HostTarget
from portproxy.target import TargetState

A, B, C, D = (Endpoint(f"10.0.0.{i}", 80) for i in range(1, 5))


def keys(order: list[Endpoint]) -> list[str]:
    return [str(e) for e in order]


def test_endpoint_set_sorts_dedups_and_diffs() -> None:
    s = EndpointSet.of([C, A, B, A])
    assert s.endpoints == (A, B, C)
    assert len(s) == 3 and s and not EndpointSet()
    added, removed = s.diff(EndpointSet.of([B, C, D]))
    assert added == [D] and removed == [A]
    assert str(Endpoint("fd00::1", 53)) == "[fd00::1]:53"


def test_round_robin_rotates_through_every_endpoint() -> None:
    balancer = Balancer(BalancePolicy.ROUND_ROBIN)
    s = EndpointSet.of([A, B, C])
    orders = [balancer.order(s) for _ in range(4)]
    assert [o[0] for o in orders] == [A, B, C, A]
    # The rest of each order is the fallback list: every endpoint, each once.
    assert all(sorted(o) == [A, B, C] for o in orders)
    assert orders[1] == [B, C, A]


def test_empty_set_gives_empty_order_for_every_policy() -> None:
    for policy in BalancePolicy:
        assert Balancer(policy).order(EndpointSet(), "192.0.2.1") == []


def test_least_conn_prefers_fewest_active_and_rotates_ties() -> None:
    balancer = Balancer(BalancePolicy.LEAST_CONN)
    s = EndpointSet.of([A, B, C])
    active = {A.key: 5, B.key: 1, C.key: 3}
    assert balancer.order(s, active=active) == [B, C, A]
    tie = {A.key: 2, B.key: 2, C.key: 7}
    firsts = {balancer.order(s, active=tie)[0] for _ in range(4)}
    assert firsts == {A, B}
    assert balancer.order(s, active=tie)[-1] == C


def test_random_uses_the_injected_rng() -> None:
    values = iter([0.0, 0.5, 0.99])
    balancer = Balancer(BalancePolicy.RANDOM, rng=lambda: next(values))
    s = EndpointSet.of([A, B, C])
    assert [balancer.order(s)[0] for _ in range(3)] == [A, B, C]


def test_source_ip_is_sticky_per_client_and_spreads_clients() -> None:
    balancer = Balancer(BalancePolicy.SOURCE_IP)
    s = EndpointSet.of([A, B, C, D])
    clients = [f"192.0.2.{i}" for i in range(1, 101)]
    first = {ip: balancer.order(s, ip)[0] for ip in clients}
    assert all(balancer.order(s, ip)[0] == first[ip] for ip in clients)
    assert set(first.values()) == {A, B, C, D}


def test_source_ip_affinity_survives_unrelated_changes() -> None:
    balancer = Balancer(BalancePolicy.SOURCE_IP)
    before = EndpointSet.of([A, B, C, D])
    clients = [f"198.51.100.{i}" for i in range(1, 201)]
    first = {ip: balancer.order(before, ip)[0] for ip in clients}
    # Remove D and add a new endpoint E: only D's clients (and some that now hash to E) move.
    e = Endpoint("10.0.0.5", 80)
    after = EndpointSet.of([A, B, C, e])
    for ip in clients:
        now = balancer.order(after, ip)[0]
        if first[ip] != D:
            assert now in (first[ip], e), ip
        else:
            assert now != D
    moved_to_e = [ip for ip in clients if balancer.order(after, ip)[0] == e]
    assert moved_to_e  # the new endpoint takes a share
    # With only a removal, nobody but the removed endpoint's clients moves.
    shrunk = EndpointSet.of([A, B, C])
    for ip in clients:
        if first[ip] != D:
            assert balancer.order(shrunk, ip)[0] == first[ip]


@pytest.mark.parametrize("policy", list(BalancePolicy))
def test_node_local_endpoints_come_first_when_any(policy: BalancePolicy) -> None:
    local1 = Endpoint("10.0.1.1", 80, "node-a")
    local2 = Endpoint("10.0.1.2", 80, "node-a")
    remote1 = Endpoint("10.0.2.1", 80, "node-b")
    remote2 = Endpoint("10.0.2.2", 80, None)
    s = EndpointSet.of([local1, local2, remote1, remote2])
    balancer = Balancer(policy, node_name="node-a", rng=lambda: 0.7)
    for i in range(6):
        order = balancer.order(s, f"192.0.2.{i}", active={})
        assert set(order[:2]) == {local1, local2}
        assert set(order[2:]) == {remote1, remote2}
    # No local endpoint: everyone is used, nothing is black-holed.
    remote_only = EndpointSet.of([remote1, remote2])
    assert sorted(balancer.order(remote_only, "192.0.2.1", active={})) == [remote1, remote2]


def test_node_local_preference_off_without_node_name() -> None:
    local = Endpoint("10.0.1.1", 80, "node-a")
    remote = Endpoint("10.0.0.1", 80, "node-b")
    balancer = Balancer(BalancePolicy.ROUND_ROBIN)
    s = EndpointSet.of([local, remote])
    assert [balancer.order(s)[0] for _ in range(2)] == [remote, local]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_passive_health_benches_with_growing_capped_backoff() -> None:
    clock = FakeClock()
    health = PassiveHealth(clock, base=1.0, cap=4.0)
    health.failed(A)
    assert health.is_benched(A) and not health.is_benched(B)
    clock.now += 0.99
    assert health.is_benched(A)
    clock.now += 0.02
    assert not health.is_benched(A)
    health.failed(A)  # second failure: 2 s
    clock.now += 1.5
    assert health.is_benched(A)
    clock.now += 0.6
    assert not health.is_benched(A)
    health.failed(A)  # 4 s
    health.failed(A)  # 8 s capped to 4 s
    clock.now += 3.9
    assert health.is_benched(A)
    clock.now += 0.2
    assert not health.is_benched(A)


def test_passive_health_survives_a_backend_down_for_hours() -> None:
    clock = FakeClock()
    health = PassiveHealth(clock, base=1.0, cap=30.0)
    for _ in range(5000):  # every connect refused, far past 2.0 ** 1024
        health.failed(A)
    clock.now += 29.9
    assert health.is_benched(A)
    clock.now += 0.2
    assert not health.is_benched(A)
    health.succeeded(A)
    health.failed(A)  # counting starts again: 1 s
    clock.now += 1.01
    assert not health.is_benched(A)


def test_passive_health_lists_the_benched_and_success_clears() -> None:
    clock = FakeClock()
    health = PassiveHealth(clock)
    assert health.benched([A, B, C]) == []
    health.failed(A)
    assert health.benched([A, B, C]) == [A]
    health.failed(C)
    assert health.benched([C, B, A]) == [C, A]
    health.succeeded(A)
    assert health.benched([A, B, C]) == [C] and not health.is_benched(A)
    # A success resets the growth: the next failure benches for base again.
    health.succeeded(C)
    health.failed(C)
    clock.now += 1.01
    assert not health.is_benched(C)


def target_of(endpoints: list[Endpoint], clock: FakeClock,
              policy: BalancePolicy = BalancePolicy.ROUND_ROBIN) -> TargetState:
    target = TargetState("t", StaticResolver(HostTarget("10.0.0.1", 80)), Balancer(policy),
                         clock=clock)
    target.update(EndpointSet.of(endpoints))
    return target


def test_round_robin_spreads_evenly_over_the_healthy_and_tries_the_benched_last() -> None:
    clock = FakeClock()
    target = target_of([A, B, C, D], clock)
    target.health.failed(B)
    firsts = [target.candidates("")[0] for _ in range(30)]
    # Not B's turns handed to its neighbour C: A, C and D ten times each.
    assert {e: firsts.count(e) for e in (A, B, C, D)} == {A: 10, B: 0, C: 10, D: 10}
    assert target.candidates("")[-1] == B  # still tried, last
    # Every endpoint benched: all are still tried, spread by the balancer.
    for endpoint in (A, C, D):
        target.health.failed(endpoint)
    firsts = [target.candidates("")[0] for _ in range(40)]
    assert {e: firsts.count(e) for e in (A, B, C, D)} == {A: 10, B: 10, C: 10, D: 10}


def test_tcp_and_udp_failures_are_kept_apart() -> None:
    # One target serves both engines of a tcp+udp forward, but an endpoint's TCP and UDP
    # sides fail apart: a UDP refusal must not bench its TCP side, nor a UDP reply clear
    # the bench of a TCP side that does not connect (every other client waited a connect
    # timeout).
    clock = FakeClock()
    target = target_of([A, B], clock, BalancePolicy.SOURCE_IP)
    client = next(f"192.0.2.{i}" for i in range(99) if target.candidates(f"192.0.2.{i}")[0] == A)
    target.health.failed(A)  # a TCP connect failed
    assert target.candidates(client) == [B, A]
    assert target.candidates(client, target.udp_health) == [A, B]
    target.udp_health.succeeded(A)  # a UDP reply
    assert target.candidates(client) == [B, A]
    target.udp_health.failed(B)
    assert target.candidates(client, target.udp_health) == [A, B]
    target.health.succeeded(A)
    assert target.candidates(client) == [A, B]
    target.update(EndpointSet.of([A]))  # gone from the set: forgotten by both
    target.update(EndpointSet.of([A, B]))
    assert not target.udp_health.is_benched(B)


def test_source_ip_over_the_healthy_keeps_other_clients_in_place() -> None:
    clock = FakeClock()
    target = target_of([A, B, C, D], clock, BalancePolicy.SOURCE_IP)
    clients = [f"192.0.2.{i}" for i in range(40)]
    before = {c: target.candidates(c)[0] for c in clients}
    target.health.failed(B)
    after = {c: target.candidates(c)[0] for c in clients}
    assert B not in after.values()
    assert all(after[c] == before[c] for c in clients if before[c] != B)


def test_passive_health_forgets_removed_endpoints() -> None:
    clock = FakeClock()
    health = PassiveHealth(clock)
    health.failed(A)
    health.failed(B)
    health.forget_missing(EndpointSet.of([B, C]))
    assert not health.is_benched(A) and health.is_benched(B)
