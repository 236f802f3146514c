"""RecentEvents: the decoded tail of a log that a store's readers share."""

from __future__ import annotations

from datetime import UTC, datetime

from kds.resource import Resource, ResourceKey
from kds.store import Deleted, Event, Upserted
from kds_stores._log import RecentEvents

MOMENT = datetime(2026, 1, 1, tzinfo=UTC)


def events(first: int, last: int) -> list[Event]:
    """Events for revisions *first* .. *last*, alternating upserts and deletions."""
    made: list[Event] = []
    for revision in range(first, last + 1):
        key = ResourceKey("Mesh", None, f"m{revision}")
        if revision % 2:
            resource = Resource(
                key=key, labels={}, spec={}, version=1, created_at=MOMENT, modified_at=MOMENT
            )
            made.append(Upserted(revision=revision, resource=resource))
        else:
            made.append(Deleted(revision=revision, key=key, version=1, labels={}))
    return made


def revisions(found: list[Event] | None) -> list[int] | None:
    return None if found is None else [event.revision for event in found]


def test_a_read_is_served_from_the_run_it_falls_in_and_never_past_the_head():
    recent = RecentEvents(capacity=100)
    recent.add(10, events(11, 20))
    assert revisions(recent.get(10, 5, head=20)) == [11, 12, 13, 14, 15]
    assert revisions(recent.get(14, 100, head=20)) == list(range(15, 21))
    assert revisions(recent.get(14, 100, head=17)) == [15, 16, 17]  # committed only
    assert recent.get(9, 5, head=20) is None  # starts before the run
    assert recent.get(20, 5, head=30) is None  # after the run: the database knows
    assert recent.get(20, 5, head=20) is None  # nothing after the head


def test_the_run_grows_when_reads_continue_it_and_keeps_only_its_capacity():
    recent = RecentEvents(capacity=15)
    recent.add(0, events(1, 10))
    recent.add(10, events(11, 20))
    assert recent.get(4, 5, head=20) is None  # dropped: beyond the capacity
    assert revisions(recent.get(5, 100, head=20)) == list(range(6, 21))
    recent.add(40, events(41, 42))  # elsewhere in the log: a new run
    assert recent.get(10, 5, head=42) is None
    assert revisions(recent.get(40, 5, head=42)) == [41, 42]


def test_events_that_are_not_the_next_revisions_are_not_kept():
    recent = RecentEvents(capacity=100)
    recent.add(10, events(12, 15))  # does not start right after 10
    assert recent.get(10, 5, head=15) is None
    recent.add(10, [*events(11, 12), *events(14, 15)])  # a gap
    assert recent.get(10, 5, head=15) is None


def test_nothing_below_a_compaction_is_served_even_if_a_late_read_adds_it():
    recent = RecentEvents(capacity=100)
    recent.add(0, events(1, 10))
    recent.forget_through(6)
    assert recent.get(0, 5, head=10) is None
    recent.add(0, events(1, 10))  # a read that started before the compaction
    assert recent.get(3, 5, head=10) is None
    assert revisions(recent.get(6, 5, head=10)) == [7, 8, 9, 10]
