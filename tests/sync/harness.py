"""Helpers for replication tests: resources as YAML, comparable views, running engines.

* :func:`load_resources` / :func:`parse_resources` read a YAML list of resources
  (``type``, ``mesh``, ``name``, ``labels``, ``spec``) as :class:`~kds.store.Upsert`
  changes, ready to commit; :func:`dump_resources` writes the same format.
* :func:`project` turns resources (stored ones or upserts) into sorted, comparable
  :class:`Item` tuples of key, labels and spec: what two planes that replicated the
  same data agree on (versions and timestamps are each store's own).
* :func:`converge` runs a :class:`~kds.sync.GlobalEngine` and one
  :class:`~kds.sync.ZoneEngine` per zone store over one
  :class:`~kds.testing.MemoryTransport`.
* :func:`wait_until_equal` / :func:`wait_until_all_equal` wait, up to a deadline,
  until stores hold exactly the expected resources, and otherwise fail with a diff.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

import anyio
import attrs
import pytest
import yaml

from kds.resource import ResourceKey
from kds.store import Store, Upsert
from kds.sync import GlobalEngine, SyncOptions, ZoneEngine
from kds.testing import MemoryTransport

__all__ = [
    "IGNORED_TYPES",
    "Federation",
    "Item",
    "ResourceLike",
    "converge",
    "diff",
    "dump_resources",
    "load_resources",
    "parse_resources",
    "project",
    "wait_until_all_equal",
    "wait_until_equal",
]

IGNORED_TYPES: Final = frozenset({"Zone", "ZoneInsight", "MeshInsight"})
"""Types every plane keeps for itself (the global makes a Zone and a ZoneInsight for
each zone that connects): never replicated, so left out of comparisons."""

_FIELDS: Final = ("type", "mesh", "name", "labels", "spec")


class ResourceLike(Protocol):
    """Anything with a key, labels and a spec: a stored resource or an upsert."""

    @property
    def key(self) -> ResourceKey: ...

    @property
    def labels(self) -> Mapping[str, str]: ...

    @property
    def spec(self) -> Mapping[str, Any]: ...


class Item(NamedTuple):
    """One resource as comparisons see it: hashable and ordered by key first.

    Attributes:
        key: type, mesh and name.
        labels: the labels as sorted ``(name, value)`` pairs.
        spec: the spec as canonical JSON (sorted keys), so nested specs compare
            and print alike whichever store they came from.
    """

    key: ResourceKey
    labels: tuple[tuple[str, str], ...]
    spec: str

    def describe(self) -> str:
        """One line: the key, then the labels and spec in flow YAML."""
        return f"{self.key} labels={_flow(dict(self.labels))} spec={_flow(self.spec_value())}"

    def spec_value(self) -> Any:
        """The spec as plain data again."""
        return json.loads(self.spec)


# -- YAML ------------------------------------------------------------------------------


def parse_resources(text: str, *, source: str = "<string>") -> list[Upsert]:
    """Read a YAML list of resources as unconditional upserts.

    Each entry is a mapping with ``type`` and ``name``, optionally ``mesh`` (omitted
    or null for global-scoped types), ``labels`` (string to string) and ``spec``
    (a mapping; empty when omitted). Anything else is refused, so a misspelt field
    cannot silently drop data from a fixture. Keys, labels and specs are not checked
    against a catalog here: committing the upserts does that.

    Args:
        text: the YAML document.
        source: names the document in error messages.

    Raises:
        ValueError: the document is not a list of such entries, or names one key twice.
    """
    document = yaml.safe_load(text)
    if document is None:
        return []
    if not isinstance(document, list):
        raise ValueError(f"{source}: expected a list of resources, got {type(document).__name__}")
    upserts: list[Upsert] = []
    seen: set[ResourceKey] = set()
    for index, entry in enumerate(document):
        where = f"{source}[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}; allowed: {list(_FIELDS)}")
        type_name, mesh, name = entry.get("type"), entry.get("mesh"), entry.get("name")
        if not isinstance(type_name, str) or not isinstance(name, str):
            raise ValueError(f"{where}: 'type' and 'name' must be strings")
        if mesh is not None and not isinstance(mesh, str):
            raise ValueError(f"{where}: 'mesh' must be a string or null")
        labels = entry.get("labels") or {}
        # YAML reads unquoted true/1 as bool/int: insist on strings, as stores do.
        if not isinstance(labels, dict) or not all(
            isinstance(label, str) and isinstance(value, str) for label, value in labels.items()
        ):
            raise ValueError(f"{where}: 'labels' must map strings to strings (quote values)")
        spec = entry.get("spec") or {}
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: 'spec' must be a mapping")
        key = ResourceKey(type_name, mesh, name)
        if key in seen:
            raise ValueError(f"{where}: {key} is listed twice")
        seen.add(key)
        upserts.append(Upsert(key=key, labels=labels, spec=spec))
    return upserts


def load_resources(path: str | Path) -> list[Upsert]:
    """Read the YAML resource list at *path*; see :func:`parse_resources`."""
    path = Path(path)
    return parse_resources(path.read_text(encoding="utf-8"), source=str(path))


def dump_resources(resources: Iterable[ResourceLike]) -> str:
    """Write *resources* in the format :func:`parse_resources` reads, sorted by key."""
    entries: list[dict[str, Any]] = []
    for resource in sorted(resources, key=lambda resource: resource.key):
        entry: dict[str, Any] = {"type": resource.key.type}
        if resource.key.mesh is not None:
            entry["mesh"] = resource.key.mesh
        entry["name"] = resource.key.name
        if resource.labels:
            entry["labels"] = dict(sorted(resource.labels.items()))
        entry["spec"] = _plain(resource.spec)
        entries.append(entry)
    return yaml.safe_dump(entries, sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    # Stored specs may hold tuples or other mapping types: YAML and JSON want plain data.
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _flow(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()


# -- comparison ------------------------------------------------------------------------


def project(
    resources: Iterable[ResourceLike], ignore_types: Collection[str] = IGNORED_TYPES
) -> list[Item]:
    """Turn *resources* into sorted :class:`Item` tuples, leaving out *ignore_types*."""
    return sorted(
        Item(
            resource.key,
            tuple(sorted(resource.labels.items())),
            json.dumps(_plain(resource.spec), sort_keys=True, default=repr),
        )
        for resource in resources
        if resource.key.type not in ignore_types
    )


def diff(expected: Sequence[Item], actual: Sequence[Item]) -> str:
    """Describe how *actual* differs from *expected*: missing, unexpected, different.

    Returns an empty string when they are equal.
    """
    want = {item.key: item for item in expected}
    have = {item.key: item for item in actual}
    missing = [want[key] for key in sorted(want.keys() - have.keys())]
    unexpected = [have[key] for key in sorted(have.keys() - want.keys())]
    different = [
        (want[key], have[key])
        for key in sorted(want.keys() & have.keys())
        if want[key] != have[key]
    ]
    lines: list[str] = []
    if missing:
        lines.append(f"missing ({len(missing)}): expected but not stored")
        lines.extend(f"  - {item.describe()}" for item in missing)
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}): stored but not expected")
        lines.extend(f"  + {item.describe()}" for item in unexpected)
    if different:
        lines.append(f"different ({len(different)}):")
        for wanted, stored in different:
            lines.append(f"  ~ {wanted.key}")
            lines.extend(_label_changes(dict(wanted.labels), dict(stored.labels)))
            if wanted.spec != stored.spec:
                lines.append(f"      spec expected: {_flow(wanted.spec_value())}")
                lines.append(f"      spec stored:   {_flow(stored.spec_value())}")
    return "\n".join(lines)


def _label_changes(wanted: dict[str, str], stored: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for label in sorted(wanted.keys() | stored.keys()):
        if label not in stored:
            lines.append(f"      label {label}: expected {wanted[label]!r}, absent")
        elif label not in wanted:
            lines.append(f"      label {label}: not expected, stored {stored[label]!r}")
        elif wanted[label] != stored[label]:
            lines.append(
                f"      label {label}: expected {wanted[label]!r}, stored {stored[label]!r}"
            )
    return lines


async def _view(store: Store, ignore_types: Collection[str]) -> list[Item]:
    return project(await store.list_resources(), ignore_types)


async def _wait_for(store: Store, expected: list[Item], ignore_types: Collection[str]) -> None:
    while True:
        # Read the head before the view: a commit landing after the read moves the head
        # past it, so wait_for_commit returns at once instead of missing that commit.
        head = await store.head()
        if await _view(store, ignore_types) == expected:
            return
        await store.wait_for_commit(head)


async def wait_until_all_equal(
    stores: Mapping[str, Store],
    expected: Mapping[str, Iterable[ResourceLike]],
    *,
    deadline: float,
    ignore_types: Collection[str] = IGNORED_TYPES,
) -> None:
    """Wait until every store's view equals its expected resources at the same time.

    Wakes on each store's commits rather than on a timer. On timeout, fails the test
    with a diff for every store that still differs.

    Args:
        stores: the stores by a name used in the failure message (``"global"``,
            ``"zone-1"``...).
        expected: for each name in *stores*, the resources it must hold (compared by
            key, labels and spec; *ignore_types* left out on both sides).
        deadline: seconds to wait before failing.
        ignore_types: types left out of the comparison.

    Raises:
        KeyError: a store has no expected resources.
    """
    wanted = {name: project(expected[name], ignore_types) for name in stores}
    with anyio.move_on_after(deadline):
        while True:
            for name, store in stores.items():
                await _wait_for(store, wanted[name], ignore_types)
            # Each store matched when its turn came; an earlier one may have moved on
            # since (a transient state), so only a pass where all match at once counts.
            views = {name: await _view(store, ignore_types) for name, store in stores.items()}
            if all(views[name] == wanted[name] for name in stores):
                return
    # Read once more outside the expired scope, so the report shows the latest views.
    reports: list[str] = []
    for name, store in stores.items():
        difference = diff(wanted[name], await _view(store, ignore_types))
        if difference:
            reports.append(f"{name}:\n{_indent(difference)}")
    if reports:
        pytest.fail(
            f"not converged within {deadline:g}s:\n" + "\n".join(reports),
            pytrace=False,
        )


async def wait_until_equal(
    store: Store,
    expected: Iterable[ResourceLike],
    *,
    deadline: float,
    ignore_types: Collection[str] = IGNORED_TYPES,
    name: str = "store",
) -> None:
    """Wait until *store*'s view equals *expected*; see :func:`wait_until_all_equal`.

    Args:
        store: the store to watch.
        expected: the resources it must hold.
        deadline: seconds to wait before failing with a diff.
        ignore_types: types left out of the comparison.
        name: names the store in the failure message.
    """
    await wait_until_all_equal(
        {name: store}, {name: expected}, deadline=deadline, ignore_types=ignore_types
    )


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


# -- running engines -------------------------------------------------------------------


@attrs.frozen
class Federation:
    """What :func:`converge` started, for tests that disturb it.

    Attributes:
        transport: the transport the global serves on; zones dial views of it that
            carry their identity. Use it to sever sessions or refuse connections.
        global_engine: the global's engine.
        zone_engines: each zone's engine, by zone name.
    """

    transport: MemoryTransport
    global_engine: GlobalEngine
    zone_engines: Mapping[str, ZoneEngine]


@asynccontextmanager
async def converge(
    global_store: Store,
    zone_stores: Mapping[str, Store],
    *,
    options: SyncOptions | None = None,
    transport: MemoryTransport | None = None,
) -> AsyncIterator[Federation]:
    """Run a global engine and one zone engine per zone store until the block ends.

    The stores must be open; they stay open afterwards. The global is serving before
    the block starts; zones connect (and reconnect) in the background, each
    authenticated as its zone name. Leaving the block cancels every engine. An
    engine that fails ends the block with its error.

    Args:
        global_store: the global control plane's store.
        zone_stores: each zone's store, by zone name.
        options: engine settings (heartbeats, reconnect backoff); the engines'
            defaults when omitted.
        transport: the transport to run over; a new :class:`MemoryTransport` when
            omitted.

    Yields:
        The transport and the engines.
    """
    transport = transport if transport is not None else MemoryTransport()
    sync_options = options if options is not None else SyncOptions()
    global_engine = GlobalEngine(global_store, transport, options=sync_options)
    zone_engines = {
        zone: ZoneEngine(store, transport.with_identity(zone), zone=zone, options=sync_options)
        for zone, store in zone_stores.items()
    }
    try:
        async with anyio.create_task_group() as task_group:
            await task_group.start(global_engine.run)
            for engine in zone_engines.values():
                task_group.start_soon(engine.run)
            yield Federation(transport, global_engine, zone_engines)
            task_group.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A failed assertion in the block comes back wrapped by the task group; unwrap
        # a lone error so the test report shows it (and its diff) directly.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
