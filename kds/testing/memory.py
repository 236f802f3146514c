"""MemoryStore: the reference model of the Store contract.

It keeps everything in Python structures and is written for obviousness, not
speed: the conformance suite compares every other backend with it. Nothing
survives the process.
"""

from __future__ import annotations

import bisect
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, final

import anyio
import attrs

from kds.catalog import DEFAULT_CATALOG
from kds.errors import CompactedError, NotFoundError, StoreClosedError
from kds.resource import Catalog, Resource, ResourceKey
from kds.store import (
    DEFAULT_READ_LIMIT,
    Cursor,
    Delete,
    Deleted,
    Event,
    PreparedChange,
    Snapshot,
    Store,
    StoredVersion,
    Tracking,
    Upserted,
    check_expected,
    check_read_args,
    matches,
    unpack_mapping,
)

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

__all__ = ["MemoryStore"]


@attrs.frozen
class _Row:
    resource: Resource
    labels_blob: bytes
    spec_blob: bytes


@final
class MemoryStore(Store):
    """In-process reference implementation of :class:`~kds.Store`.

    Args:
        catalog: the resource types this store accepts.
    """

    def __init__(self, *, catalog: Catalog = DEFAULT_CATALOG) -> None:
        super().__init__(catalog=catalog)
        self._epoch = uuid.uuid4().hex
        self._open = False
        self._view: dict[ResourceKey, _Row] = {}
        self._log: list[Event] = []
        self._head = 0
        self._horizon = 0
        self._tracking: dict[str, Cursor] = {}
        self._changed: anyio.Event | None = None

    async def open(self) -> None:
        self._open = True

    async def aclose(self) -> None:
        self._open = False
        self._wake()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreClosedError("MemoryStore is not open")

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    @property
    def epoch(self) -> str:
        self._check_open()
        return self._epoch

    async def _commit_prepared(
        self, changes: Sequence[PreparedChange], tracking: Tracking | None
    ) -> int:
        self._check_open()
        if tracking is not None:
            error = self.tracking_conflict(tracking, self._tracking.get(tracking.origin))
            if error is not None:
                raise error
        now = datetime.now(UTC)
        # Work on a copy of the view so that a failing change leaves nothing behind.
        view = dict(self._view)
        events: list[Event] = []
        revision = self._head
        for prepared in changes:
            change = prepared.change
            key = change.key
            row = view.get(key)
            check_expected(key, change.expected_version, row.resource.version if row else 0)
            if isinstance(change, Delete):
                if row is None:
                    if change.missing_ok or change.expected_version == 0:
                        continue
                    raise NotFoundError(key)
                del view[key]
                revision += 1
                events.append(
                    Deleted(
                        revision=revision,
                        key=key,
                        version=row.resource.version,
                        labels=row.resource.labels,
                    )
                )
                continue
            assert prepared.labels_blob is not None  # noqa: S101 -- upserts are encoded
            assert prepared.spec_blob is not None  # noqa: S101 -- upserts are encoded
            if (
                row is not None
                and row.labels_blob == prepared.labels_blob
                and row.spec_blob == prepared.spec_blob
            ):
                continue
            resource = Resource(
                key=key,
                labels=unpack_mapping(prepared.labels_blob),
                spec=unpack_mapping(prepared.spec_blob),
                version=row.resource.version + 1 if row else 1,
                created_at=row.resource.created_at if row else now,
                modified_at=now,
            )
            view[key] = _Row(resource, prepared.labels_blob, prepared.spec_blob)
            revision += 1
            events.append(Upserted(revision=revision, resource=resource))
        self._view = view
        self._log.extend(events)
        self._head = revision
        if tracking is not None:
            self._tracking[tracking.origin] = tracking.cursor
        if events:
            self._wake()
        return revision

    async def compact(self, through: int) -> None:
        self._check_open()
        if through < 0 or through > self._head:
            raise ValueError(f"through must be within 0..{self._head}, got {through}")
        if through <= self._horizon:
            return
        self._log = [event for event in self._log if event.revision > through]
        self._horizon = through

    async def head(self) -> int:
        self._check_open()
        return self._head

    async def horizon(self) -> int:
        self._check_open()
        return self._horizon

    async def get(self, key: ResourceKey) -> Resource:
        self._check_open()
        row = self._view.get(key)
        if row is None:
            raise NotFoundError(key)
        return row.resource

    async def find_many(self, keys: Collection[ResourceKey]) -> dict[ResourceKey, Resource]:
        self._check_open()
        view = self._view
        return {key: view[key].resource for key in keys if key in view}

    async def find_versions(
        self, keys: Collection[ResourceKey]
    ) -> dict[ResourceKey, StoredVersion]:
        self._check_open()
        view = self._view
        return {
            key: StoredVersion(view[key].resource.version, view[key].resource.labels)
            for key in keys
            if key in view
        }

    async def list_resources(
        self,
        type_name: str | None = None,
        *,
        mesh: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Resource]:
        self._check_open()
        return [
            row.resource
            for key, row in sorted(self._view.items())
            if matches(row.resource, type_name, mesh, labels)
        ]

    async def snapshot(self, types: Collection[str] | None = None) -> Snapshot:
        self._check_open()
        resources = [
            row.resource
            for key, row in sorted(self._view.items())
            if types is None or key.type in types
        ]
        return Snapshot(cursor=Cursor(self._epoch, self._head), resources=resources)

    async def read(self, after: int, *, limit: int = DEFAULT_READ_LIMIT) -> list[Event]:
        self._check_open()
        check_read_args(after, limit)
        if after < self._horizon:
            raise CompactedError(after, self._horizon)
        start = bisect.bisect_right(self._log, after, key=lambda event: event.revision)
        return self._log[start : start + limit]

    async def tracking(self, origin: str) -> Cursor | None:
        self._check_open()
        return self._tracking.get(origin)

    async def wait_for_commit(self, after: int) -> None:
        self._check_open()
        if self._head > after:
            return
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()
        self._check_open()
