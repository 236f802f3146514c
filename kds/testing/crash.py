"""Crash tests: a child process commits numbered batches until it is killed with SIGKILL.

Run as ``python -m kds.testing.crash SPEC``, where SPEC is a
:class:`~kds.testing.factory.StoreSpec` as JSON (``{"backend": ..., "kwargs": ...}``)
or the path of a pickled one. The child opens the store, reads the tracking
cursor of :data:`ORIGIN` (say it is at *n*), prints ``resumed n``, then commits
batch *n+1*, *n+2*, ... forever, each together with the tracking cursor at that
batch number, printing ``committed k`` after batch *k* has committed.

Batch *k* (:func:`batch_changes`) upserts several recognisable resources, bumps
a counter resource with an expected version of *k-1*, overwrites a resource an
earlier batch wrote, and deletes a resource of batch *k-3*, so a partial, lost
or repeated batch shows in the view, in the versions and in the log.

The parent side (:func:`kill_child`, :func:`check_recovered`) starts a child,
kills it at an arbitrary point after it reported some commits, and checks that
the reopened store holds exactly batches 1 to the stored cursor. Only durable
stores can take part: nothing of a MemoryStore survives its process.

A store that declares :attr:`~kds.store.Atomicity.ORDERED_PREFIX` is checked for
that weaker promise instead: after the kill it may also hold a prefix of the batch
after the cursor (never anything else), and the next child applies that batch the
way replication re-applies a batch whose cursor did not move -- each change
expecting the version stored now -- which must complete it without repeating
anything: the log afterwards holds each change of the batch exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Final, TextIO

import anyio
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream

from kds.resource import ResourceKey
from kds.store import MUST_NOT_EXIST, Atomicity, Change, Cursor, Delete, Tracking, Upsert
from kds.testing.checks import apply_events, event_content, read_all, view_content
from kds.testing.factory import StoreSpec
from kds.testing.memory import MemoryStore

if TYPE_CHECKING:
    from anyio.abc import ByteReceiveStream

    from kds.store import Store

__all__ = [
    "EPOCH",
    "ORIGIN",
    "TIMEOUT",
    "CrashRound",
    "batch_changes",
    "batch_tracking",
    "check_recovered",
    "kill_child",
    "main",
    "run_child",
]

ORIGIN: Final = "crash-test"
"""The tracking origin the child records its progress under."""

EPOCH: Final = "crash-source"
"""The epoch of the (imaginary) log whose revisions are the batch numbers."""

MESH: Final = "crash"
COUNTER: Final = ResourceKey("Mesh", None, "crash-counter")
"""Changed by every batch: after batch *k* its version is exactly *k*."""

_DELETE_LAG: Final = 3  # batch k deletes a resource batch k - 3 created
_SHARED: Final = 5  # batch k overwrites shared resource k % 5
TIMEOUT: Final = 60.0  # seconds
"""How long a child may take to start and report the commits it was asked for."""


def batch_changes(number: int) -> list[Change]:
    """The changes of batch *number* (1, 2, ...): deterministic and recognisable.

    Every resource it writes names the batch in a ``batch`` label and in its spec.
    """
    if number < 1:
        raise ValueError(f"batches are numbered from 1, got {number}")
    tag = {"batch": str(number)}
    changes: list[Change] = [
        Upsert(
            key=COUNTER,
            labels=tag,
            spec={"batch": number},
            expected_version=number - 1 if number > 1 else MUST_NOT_EXIST,
        ),
        *(
            Upsert(
                key=ResourceKey("Dataplane", MESH, f"dp-{number}-{part}"),
                labels=tag,
                spec={"batch": number, "part": part, "networking": {"port": number}},
                expected_version=MUST_NOT_EXIST,
            )
            for part in range(3)
        ),
        Upsert(
            key=ResourceKey("MeshTimeout", MESH, f"shared-{number % _SHARED}"),
            labels=tag,
            spec={"batch": number},
        ),
    ]
    if number > _DELETE_LAG:
        changes.append(
            Delete(
                key=ResourceKey("Dataplane", MESH, f"dp-{number - _DELETE_LAG}-0"),
                expected_version=1,
            )
        )
    return changes


def batch_tracking(number: int) -> Tracking:
    """The tracking cursor committed with batch *number*."""
    return Tracking(ORIGIN, Cursor(EPOCH, number))


async def replayed(store: Store, changes: list[Change]) -> list[Change]:
    """*changes* as replication applies a received batch again: expecting what is stored now.

    Each upsert expects the version stored at its key (or that there is none) and each
    delete the stored version (a no-op when it is gone), as the sync engine resolves
    every batch before committing it. What an interrupted commit already applied is
    then identical and writes nothing. The keys of one batch are distinct.
    """
    stored = await store.find_versions([change.key for change in changes])
    resolved: list[Change] = []
    for change in changes:
        version = stored[change.key].version if change.key in stored else MUST_NOT_EXIST
        if isinstance(change, Upsert):
            resolved.append(attrs.evolve(change, expected_version=version))
        else:
            resolved.append(Delete(key=change.key, expected_version=version))
    return resolved


async def run_child(spec: StoreSpec, out: TextIO, *, limit: int | None = None) -> int:
    """Commit batches after the stored cursor, reporting each on *out*; the child's body.

    Args:
        spec: the store to write.
        out: where ``resumed n`` and ``committed k`` lines go (flushed at once).
        limit: stop after this batch number (default: never stop).

    Returns:
        The last batch committed (only reached with a *limit*).
    """
    async with spec.create() as store:
        cursor = await store.tracking(ORIGIN)
        number = 0 if cursor is None else cursor.revision
        out.write(f"resumed {number}\n")
        out.flush()
        # A store without transactions may hold part of the batch after the cursor.
        replay = store.atomicity is Atomicity.ORDERED_PREFIX
        while limit is None or number < limit:
            number += 1
            changes = batch_changes(number)
            if replay:
                changes = await replayed(store, changes)
                replay = False
            await store.commit(changes, tracking=batch_tracking(number))
            out.write(f"committed {number}\n")
            out.flush()
    return number


def _load_spec(argument: str) -> StoreSpec:
    if argument.lstrip().startswith("{"):
        data = json.loads(argument)
        return StoreSpec(data["backend"], data.get("kwargs", {}))
    with open(argument, "rb") as file:
        # The parent test wrote this file for its own child: trusted input.
        spec = pickle.load(file)  # noqa: S301
    if not isinstance(spec, StoreSpec):
        raise TypeError(f"{argument} holds a {type(spec).__name__}, not a StoreSpec")
    return spec


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m kds.testing.crash SPEC [LIMIT]``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        sys.exit("usage: python -m kds.testing.crash SPEC-JSON-OR-PICKLE-PATH [LIMIT]")
    spec = _load_spec(args[0])
    limit = int(args[1]) if len(args) == 2 else None
    anyio.run(lambda: run_child(spec, sys.stdout, limit=limit), backend="asyncio")


@attrs.frozen
class CrashRound:
    """What the parent saw of one child before and after killing it.

    Attributes:
        resumed: the cursor the child found (it then committed from ``resumed + 1``).
        reported: the last batch the child reported as committed.
        returncode: the child's exit status (``-9``: SIGKILL ended it).
    """

    resumed: int
    reported: int
    returncode: int


def _spec_argument(spec: StoreSpec, directory: str) -> str:
    try:
        return json.dumps({"backend": spec.backend, "kwargs": dict(spec.kwargs)})
    except TypeError:
        fd, path = tempfile.mkstemp(suffix=".spec.pickle", dir=directory)
        with os.fdopen(fd, "wb") as file:
            pickle.dump(spec, file)
        return path


def _parse(line: bytes) -> tuple[str, int]:
    word, _, number = line.decode().partition(" ")
    return word, int(number)


async def kill_child(spec: StoreSpec, *, commits: int, delay: float = 0.0) -> CrashRound:
    """Start a child on *spec*, let it report *commits* more batches, then SIGKILL it.

    The child keeps committing while the parent reads its reports, so the kill
    lands at an arbitrary point of a later batch: between transactions, inside
    one, or while it is being made durable.

    Args:
        spec: the store, as the child will open it.
        commits: how many batches the child must report before the kill (>= 1).
        delay: extra seconds to let the child run before the kill, to vary where
            it lands (not to wait for anything).

    Raises:
        AssertionError: the child exited on its own, or did not report its commits
            within :data:`TIMEOUT`.
    """
    with tempfile.TemporaryDirectory() as directory:
        command = [sys.executable, "-m", "kds.testing.crash", _spec_argument(spec, directory)]
        async with await anyio.open_process(command, stderr=subprocess.PIPE) as process:
            assert process.stdout is not None  # noqa: S101 -- open_process pipes stdout
            assert process.stderr is not None  # noqa: S101 -- and stderr, as asked
            lines = BufferedByteReceiveStream(process.stdout)
            resumed = reported = -1
            failure: Exception | None = None
            try:
                with anyio.fail_after(TIMEOUT):
                    word, resumed = _parse(await lines.receive_until(b"\n", 100))
                    if word != "resumed":
                        raise AssertionError(f"the child said {word!r} first")
                    reported = resumed
                    while reported < resumed + commits:
                        reported = _next_report(reported, await lines.receive_until(b"\n", 100))
                if delay > 0:
                    # Not synchronisation: only varies where in its loop the kill lands.
                    await anyio.sleep(delay)
            except (anyio.EndOfStream, anyio.IncompleteRead, TimeoutError) as exc:
                failure = exc
            finally:
                process.kill()
                returncode = await process.wait()
                errors = await _read_to_end(process.stderr)
            if failure is not None:
                raise AssertionError(
                    f"the crash child stopped reporting after batch {reported} "
                    f"(exit {returncode}):\n{errors}"
                ) from failure
            if returncode != -signal.SIGKILL:
                raise AssertionError(f"the child ended with exit {returncode}:\n{errors}")
            # Reports already in the pipe when the child died still count.
            with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
                while True:
                    reported = _next_report(reported, await lines.receive_until(b"\n", 100))
        return CrashRound(resumed=resumed, reported=reported, returncode=returncode)


def _next_report(reported: int, line: bytes) -> int:
    word, number = _parse(line)
    if word != "committed" or number != reported + 1:
        raise AssertionError(f"after batch {reported}, the child said {line!r}")
    return number


async def _read_to_end(stream: ByteReceiveStream) -> str:
    chunks: list[bytes] = []
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            chunks.append(await stream.receive())
    return b"".join(chunks).decode(errors="replace")


async def _expected_store(last: int, partial: int = 0) -> MemoryStore:
    """A MemoryStore holding batches 1..*last* and the first *partial* changes of the next."""
    model = MemoryStore()
    await model.open()
    for number in range(1, last + 1):
        await model.commit(batch_changes(number), tracking=batch_tracking(number))
    if partial:
        await model.commit(batch_changes(last + 1)[:partial])
    return model


async def _applied_prefix(store: Store, last: int) -> int:
    """How many changes of batch *last* + 1 an ORDERED_PREFIX store holds (0 for none).

    Raises:
        AssertionError: the view is not batches 1..*last* plus a prefix of the next.
    """
    view = view_content(await store.list_resources())
    for partial in range(len(batch_changes(last + 1)) + 1):
        model = await _expected_store(last, partial)
        try:
            if view == view_content(await model.list_resources()):
                return partial
        finally:
            await model.aclose()
    raise AssertionError(
        f"the view is not batches 1..{last} plus a prefix of batch {last + 1}: {view!r}"
    )


async def check_recovered(store: Store, round_: CrashRound) -> int:
    """Check that *store*, reopened after *round_*, holds exactly batches 1..cursor.

    The stored cursor must be the last reported batch or the one after it (which
    may have committed before its report was written); the view, its versions
    and the log must equal those of a MemoryStore that applied exactly the
    batches up to the cursor (for an ORDERED_PREFIX store, plus a prefix of the
    next batch); the log must replay to the view.

    Returns:
        The stored cursor: the next child resumes after it.

    Raises:
        AssertionError: a batch was lost, partly applied or applied twice.
    """
    cursor = await store.tracking(ORIGIN)
    if cursor is None or cursor.epoch != EPOCH:
        raise AssertionError(f"tracking cursor after the crash: {cursor!r}")
    last = cursor.revision
    if not round_.reported <= last <= round_.reported + 1:
        raise AssertionError(
            f"the child reported batch {round_.reported} committed, the store is at batch {last}"
        )
    if round_.returncode != -signal.SIGKILL:
        raise AssertionError(f"the child did not die of SIGKILL: exit {round_.returncode}")
    partial = 0
    if store.atomicity is Atomicity.ORDERED_PREFIX:
        partial = await _applied_prefix(store, last)
    expected = await _expected_store(last, partial)
    try:
        view = view_content(await store.list_resources())
        _same(view, view_content(await expected.list_resources()), f"view after batch {last}")
        events = await read_all(store, 0)
        _same(
            [event_content(event, revision=False) for event in events],
            [event_content(event, revision=False) for event in await read_all(expected, 0)],
            f"log after batch {last}",
        )
        _same(sorted(apply_events({}, events).values()), view, "the log replayed vs the view")
        head = await store.head()
        _same(head, events[-1].revision if events else 0, "head vs the last event")
    finally:
        await expected.aclose()
    return last


def _same(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}:\n  got:      {actual!r}\n  expected: {expected!r}")


if __name__ == "__main__":
    main()
