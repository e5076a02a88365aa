"""Streamed updates to clients are coalesced: the first at once, the newest at most every interval, the last always."""

import itertools

from rlhf_live.serving import samplers as common


def test_fast_updates_are_coalesced_and_the_last_always_arrives(monkeypatch):
    clock = itertools.count(0.0, 0.01)  # an update every 10 ms
    monkeypatch.setattr(common, "_clock", lambda: next(clock))
    got = list(common.coalesced(iter(range(100)), interval=0.05))
    assert got[0] == 0 and got[-1] == 99
    assert got == sorted(got) and 18 <= len(got) <= 22  # ~ one in five, none out of order


def test_slow_updates_all_arrive(monkeypatch):
    clock = itertools.count(0.0, 0.1)
    monkeypatch.setattr(common, "_clock", lambda: next(clock))
    assert list(common.coalesced(iter(range(10)), interval=0.05)) == list(range(10))


def test_closing_the_client_closes_the_stream():
    closed = []

    def updates():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    stream = common.coalesced(updates(), interval=0.0)
    assert next(stream) == 0
    stream.close()
    assert closed == [True]
