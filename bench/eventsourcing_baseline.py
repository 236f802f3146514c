"""Baseline: the ``eventsourcing`` library's live leader -> follower rate on SQLite.

Run it as a script (it is not a test)::

    python bench/eventsourcing_baseline.py [--count 20000]

or call :func:`eventsourcing_follower_rate` from another benchmark. It needs the
``bench`` extra (``pip install -e '.[bench]'``).

The setup, and why it compares fairly with ``sync_bench.py``'s sustained
global -> zone replication:

* Both sides persist with the library's own SQLite module
  (``PERSISTENCE_MODULE=eventsourcing.sqlite``), one database file each, in WAL
  mode with SQLite's default ``synchronous`` (FULL), as our stores do.
* The leader (``GlobalApp``) holds one ``Resource`` aggregate per resource, as
  our global holds one row per resource. It records *count* ``Resource.Updated``
  events, one per resource, each carrying the same ~150-byte spec dict as ours,
  saving 1,000 aggregates per ``save()`` call: one transaction per 1,000
  changes, the analogue of our batches of 1,000.
* The follower (``ZoneApp``, a ``ProcessApplication``) applies each update the
  way an event-sourced zone would: it loads its own ``ResourceCopy`` aggregate
  from its store, updates it, and records the new event with the tracking
  record (the leader's notification id) atomically in its own SQLite file. That
  is a read and a durable write per change, like our zone's upsert with its
  cursor -- not a no-op. Like the zone, it starts with a copy of every resource
  (made in an untimed warm-up through the same live system), so every measured
  event is an update of an existing resource, as in our sustained phase.
* Replication is live: the follower is prompted by the leader's saves and pulls
  the new notifications from the leader's notification log (its SQLite table),
  as our zone is pushed to and reads the global's log.

Leader and follower run in one process, with the library's
``MultiThreadedRunner`` (the follower in its own thread). They cannot run in
separate processes with the library's runners on SQLite: its system runners are
all in-process, and the cross-process alternative (projection runners
subscribing to an application's recorder) needs a recorder with subscriptions,
which ``eventsourcing.sqlite`` does not implement (of the persistence modules only
PostgreSQL's works across processes). So, unlike our global and zone, leader and
follower share one interpreter's GIL.

The library's follower records each processed event, with its tracking record, in
a transaction of its own (it has no way to batch them), so its rate is bounded by
the rate at which SQLite commits single durable transactions on the machine's
disk -- which is what this baseline shows against our batched apply.

The rate runs from the first leader ``save()`` of the measured updates to the
follower's tracking record reaching the leader's last notification id.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event
from eventsourcing.system import (
    Leader,
    MultiThreadedRunner,
    ProcessApplication,
    System,
)

if TYPE_CHECKING:
    from eventsourcing.application import ProcessingEvent

# The spec of our benchmark's resources (sync_bench.SPEC), repeated so that this
# module runs without the benchmark's imports; "generation" makes each update differ.
SPEC: dict[str, Any] = {
    "targetRef": {"kind": "Mesh"},
    "to": [{"targetRef": {"kind": "Mesh"}, "default": {}}],
}
BATCH = 1000  # aggregates per leader save(): our benchmark commits batches of 1,000
POLL = 0.005  # seconds between looks at the follower's tracking position


class Resource(Aggregate):
    """A resource on the leader: one aggregate per resource."""

    class Created(Aggregate.Created):
        """The resource was created."""

        name: str
        labels: dict[str, str]
        spec: dict[str, Any]

    class Updated(Aggregate.Event):
        """The resource's spec changed."""

        spec: dict[str, Any]

    @staticmethod
    def create_id(name: str) -> UUID:
        """A stable id for the resource's name (the library passes ``__init__``'s args)."""
        return uuid5(NAMESPACE_URL, f"/resources/{name}")

    @event(Created)
    def __init__(self, name: str, labels: dict[str, str], spec: dict[str, Any]) -> None:
        self.name = name
        self.labels = labels
        self.spec = spec

    @event(Updated)
    def update(self, spec: dict[str, Any]) -> None:
        """Replace the spec."""
        self.spec = spec


class ResourceCopy(Aggregate):
    """The follower's copy of a leader resource."""

    class Created(Aggregate.Created):
        """The copy was made."""

        source_id: UUID
        name: str
        labels: dict[str, str]
        spec: dict[str, Any]

    class Updated(Aggregate.Event):
        """The copy took the source's new spec."""

        spec: dict[str, Any]

    @staticmethod
    def create_id(source_id: UUID) -> UUID:
        """The copy's id follows from its source's, so the follower can find it."""
        return uuid5(source_id, "copy")

    @event(Created)
    def __init__(
        self, source_id: UUID, name: str, labels: dict[str, str], spec: dict[str, Any]
    ) -> None:
        self.source_id = source_id
        self.name = name
        self.labels = labels
        self.spec = spec

    @event(Updated)
    def update(self, spec: dict[str, Any]) -> None:
        """Take the source's new spec."""
        self.spec = spec


class GlobalApp(Leader[UUID]):
    """The leader: records resource changes."""


class ZoneApp(ProcessApplication[UUID]):
    """The follower: keeps a copy of every leader resource."""

    def policy(
        self,
        domain_event: Any,
        processing_event: ProcessingEvent[UUID],
    ) -> None:
        """Apply one leader event to the copy; the library records it with tracking."""
        copy: ResourceCopy
        if isinstance(domain_event, Resource.Created):
            copy = ResourceCopy(
                source_id=domain_event.originator_id,
                name=domain_event.name,
                labels=domain_event.labels,
                spec=domain_event.spec,
            )
        elif isinstance(domain_event, Resource.Updated):
            copy = self.repository.get(ResourceCopy.create_id(domain_event.originator_id))
            copy.update(spec=domain_event.spec)
        else:
            return
        processing_event.collect_events(copy)


def _wait_processed(
    runner: MultiThreadedRunner[UUID], zone: ZoneApp, position: int, deadline: float
) -> None:
    """Until the follower has tracked the leader's notification *position*."""
    give_up = time.monotonic() + deadline
    while True:
        # A dead follower thread would never get there: fail with its error instead.
        if runner.has_errored.is_set():
            runner.reraise_thread_errors()
        tracked = zone.recorder.max_tracking_id(GlobalApp.name)
        if tracked is not None and tracked >= position:
            return
        if time.monotonic() > give_up:
            msg = f"follower at {tracked} after {deadline:.0f} s, leader at {position}"
            raise TimeoutError(msg)
        time.sleep(POLL)


def eventsourcing_follower_rate(directory: Path, count: int) -> float:
    """Events/s the ``eventsourcing`` follower processes live from its SQLite leader.

    Creates ``leader.db`` and ``follower.db`` in *directory*; *count* resources are
    first created and copied (not timed), then each is updated once, in saves of
    1,000, and the rate is *count* over the time from the first of those saves to
    the follower having processed the last. The module docstring says why this
    setup compares with ours.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    system = System(pipes=[[GlobalApp, ZoneApp]])
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        # Per-application settings are prefixed with the application's name.
        f"{GlobalApp.name.upper()}_SQLITE_DBNAME": str(directory / "leader.db"),
        f"{ZoneApp.name.upper()}_SQLITE_DBNAME": str(directory / "follower.db"),
    }
    # Generous: an order of magnitude below the expected rate, and at least a minute.
    deadline = max(60.0, count / 100)
    runner: MultiThreadedRunner[UUID] = MultiThreadedRunner(system, env=env)
    with runner:
        leader = runner.get(GlobalApp)
        zone = runner.get(ZoneApp)

        # The leader keeps its aggregates in memory rather than loading each from
        # its store before updating it (where our global reads a batch's rows in one
        # query): if anything, that favours the baseline.
        resources = [
            Resource(
                name=f"timeout-{number:07d}",
                labels={"team": f"team-{number % 20}"},
                spec={**SPEC, "generation": 0},
            )
            for number in range(count)
        ]
        position = 0
        for start in range(0, count, BATCH):
            position = leader.save(*resources[start : start + BATCH])[-1].notification.id
        _wait_processed(runner, zone, position, deadline)

        started = time.perf_counter()
        for start in range(0, count, BATCH):
            batch = resources[start : start + BATCH]
            for resource in batch:
                resource.update(spec={**SPEC, "generation": 1})
            position = leader.save(*batch)[-1].notification.id
        _wait_processed(runner, zone, position, deadline)
        return count / (time.perf_counter() - started)


def main() -> None:
    """Measure the rate in a temporary directory and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="events to replicate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kds-eventsourcing-bench-") as directory:
        rate = eventsourcing_follower_rate(Path(directory), args.count)
    print(
        f"eventsourcing leader->follower on SQLite (MultiThreadedRunner), "
        f"{args.count:,} events: {rate:,.0f} events/s"
    )


if __name__ == "__main__":
    main()
