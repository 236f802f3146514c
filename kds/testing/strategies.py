"""Hypothesis strategies for the Store conformance suite.

Keys are drawn from a deliberately small pool (a few types, meshes and names),
and labels and specs often come from small fixed sets, so that generated commits
collide: the same key is written twice, an upsert repeats the stored content, an
expected version is stale. Every strategy's defaults fit
:data:`~kds.catalog.DEFAULT_CATALOG`; pass your own pools for another catalog.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

import attrs
import msgpack
from hypothesis import strategies as st

from kds.catalog import DEFAULT_CATALOG
from kds.errors import ValidationError
from kds.resource import MAX_NAME_LENGTH, Catalog, Resource, ResourceKey, Scope
from kds.store import MUST_NOT_EXIST, Change, Cursor, Delete, Tracking, Upsert

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from hypothesis.strategies import SearchStrategy

__all__ = [
    "EPOCHS",
    "LABEL_NAMES",
    "LABEL_VALUES",
    "MESHES",
    "NAMES",
    "ORIGINS",
    "TYPES",
    "InvalidChange",
    "batches",
    "changes",
    "consistent_batches",
    "deletes",
    "expected_versions",
    "invalid_changes",
    "invalid_trackings",
    "label_filters",
    "labels",
    "msgpack_values",
    "resource_keys",
    "specs",
    "trackings",
    "upserts",
    "wide_trackings",
]

TYPES: Final = ("Mesh", "Zone", "Dataplane", "MeshTimeout")
"""Default type pool: two global-scoped and two mesh-scoped types of the default catalog."""

MESHES: Final = ("default", "demo")
"""Default mesh pool for mesh-scoped keys."""

NAMES: Final = ("a", "b", "c")
"""Default name pool: small, so keys collide often."""

LABEL_NAMES: Final = ("kuma.io/origin", "kuma.io/zone", "team", "env")
"""Default label names."""

LABEL_VALUES: Final = ("global", "zone", "zone-1", "blue", "")
"""Default label values (the empty string is a valid value)."""

ORIGINS: Final = ("global", "zone-1")
"""Default tracking origins."""

EPOCHS: Final = ("epoch-a", "epoch-b")
"""Default epochs of the (imaginary) logs that tracking cursors point into."""

# Fields the default catalog's validators check, with values they accept.
_DICTS: Final = st.dictionaries(st.sampled_from(("name", "kind", "port")), st.integers(0, 9))
_LISTS: Final = st.lists(st.sampled_from(("x", "y", "z")), max_size=3)
_KNOWN_FIELDS: Final[Mapping[str, Mapping[str, SearchStrategy[Any]]]] = {
    "Mesh": {"mtls": _DICTS, "networking": _DICTS, "routing": _DICTS},
    "Zone": {"enabled": st.booleans()},
    "Dataplane": {"networking": _DICTS},
    "MeshTimeout": {"targetRef": _DICTS, "to": _LISTS, "from": _LISTS, "rules": _LISTS},
}
# Field names no default validator looks at.
_FREE_FIELDS: Final = ("x", "y", "note")
_SMALL_SPECS: Final[tuple[dict[str, Any], ...]] = ({}, {"x": 1}, {"x": 2}, {"x": 1, "y": "two"})


def msgpack_values(*, max_leaves: int = 8) -> SearchStrategy[Any]:
    """Values that survive a msgpack round trip unchanged (and compare equal after it).

    None, booleans, 64-bit integers, finite floats, text, bytes, and lists and
    string-keyed dicts of those. No tuples (they come back as lists) and no NaN
    (it is not equal to itself).

    Args:
        max_leaves: bound on the number of scalars in one value.
    """
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.binary(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.text(max_size=4), children, max_size=3),
        ),
        max_leaves=max_leaves,
    )


def resource_keys(
    *,
    catalog: Catalog = DEFAULT_CATALOG,
    types: Sequence[str] = TYPES,
    meshes: Sequence[str] = MESHES,
    names: Sequence[str] = NAMES,
) -> SearchStrategy[ResourceKey]:
    """Valid keys over a small pool, with a mesh exactly when the type is mesh-scoped.

    Args:
        catalog: where to look up each type's scope.
        types: the type names to draw from (all must be in *catalog*).
        meshes: the meshes of mesh-scoped keys.
        names: the resource names.
    """

    def key_of(type_name: str) -> SearchStrategy[ResourceKey]:
        names_ = st.sampled_from(names)
        if catalog[type_name].scope is Scope.MESH:
            return st.builds(ResourceKey, st.just(type_name), st.sampled_from(meshes), names_)
        return st.builds(ResourceKey, st.just(type_name), st.none(), names_)

    return st.sampled_from(types).flatmap(key_of)


def labels(
    *,
    names: Sequence[str] = LABEL_NAMES,
    values: Sequence[str] = LABEL_VALUES,
    max_size: int = 3,
) -> SearchStrategy[dict[str, str]]:
    """Valid labels over a small pool of names and values (often empty)."""
    return st.one_of(
        st.just({}),
        st.dictionaries(st.sampled_from(names), st.sampled_from(values), max_size=max_size),
    )


def label_filters(
    *, names: Sequence[str] = LABEL_NAMES, values: Sequence[str] = LABEL_VALUES
) -> SearchStrategy[dict[str, str] | None]:
    """A ``labels=`` filter for :meth:`~kds.store.Store.list_resources`, or ``None``."""
    return st.none() | st.dictionaries(st.sampled_from(names), st.sampled_from(values), max_size=2)


def specs(
    type_name: str, *, catalog: Catalog = DEFAULT_CATALOG, rich: bool = True
) -> SearchStrategy[dict[str, Any]]:
    """Specs that *type_name*'s validator accepts and msgpack round-trips unchanged.

    Often one of a few small fixed specs (so an upsert repeats the stored content),
    otherwise the type's known fields (for the default catalog's types) plus free
    fields.

    Args:
        type_name: the resource type the spec is for.
        catalog: where to find the type's validator.
        rich: free fields hold arbitrary :func:`msgpack_values`; when False they
            hold small integers, which keeps long stateful runs within
            Hypothesis's data budget.
    """
    resource_type = catalog[type_name]
    known = _KNOWN_FIELDS.get(type_name, {})
    free = msgpack_values() if rich else st.integers(0, 3)
    varied = st.fixed_dictionaries(
        {},
        optional={**known, **{name: free for name in _FREE_FIELDS if name not in known}},
    )

    def accepted(spec: dict[str, Any]) -> bool:
        try:
            resource_type.validate_spec(spec)
        except ValidationError:
            return False
        return True

    return st.one_of(st.sampled_from(_SMALL_SPECS).map(dict), varied).filter(accepted)


def expected_versions(actual: int | None = None) -> SearchStrategy[int | None]:
    """An ``expected_version``: ``None``, :data:`MUST_NOT_EXIST` or a plausible version.

    Args:
        actual: the stored version if known (0 = missing). Then the right version
            is drawn often, and wrong ones are near it.
    """
    if actual is None:
        return st.one_of(st.none(), st.just(MUST_NOT_EXIST), st.integers(1, 4))
    return st.one_of(
        st.none(),
        st.just(actual),
        st.just(actual),
        st.just(MUST_NOT_EXIST),
        st.integers(max(1, actual - 1), actual + 1),
    )


def upserts(
    *,
    keys: SearchStrategy[ResourceKey] | None = None,
    versions: Mapping[ResourceKey, int] | None = None,
    conditional: bool = True,
    catalog: Catalog = DEFAULT_CATALOG,
    rich: bool = True,
) -> SearchStrategy[Upsert]:
    """An :class:`~kds.store.Upsert` with labels, a valid spec and maybe an expectation.

    Args:
        keys: where keys come from (default :func:`resource_keys`).
        versions: the stored version of each key (absent = missing), to aim
            expected versions near the truth.
        conditional: when False, ``expected_version`` is always ``None``.
        catalog: the catalog specs must satisfy.
        rich: as for :func:`specs`.
    """
    return _upserts(
        keys if keys is not None else resource_keys(catalog=catalog),
        versions,
        conditional,
        catalog,
        rich,
    )


@st.composite
def _upserts(
    draw: st.DrawFn,
    keys: SearchStrategy[ResourceKey],
    versions: Mapping[ResourceKey, int] | None,
    conditional: bool,
    catalog: Catalog,
    rich: bool,
) -> Upsert:
    key = draw(keys)
    expected = (
        draw(expected_versions(None if versions is None else versions.get(key, 0)))
        if conditional
        else None
    )
    return Upsert(
        key=key,
        labels=draw(labels()),
        spec=draw(specs(key.type, catalog=catalog, rich=rich)),
        expected_version=expected,
    )


def deletes(
    *,
    keys: SearchStrategy[ResourceKey] | None = None,
    versions: Mapping[ResourceKey, int] | None = None,
    conditional: bool = True,
) -> SearchStrategy[Delete]:
    """A :class:`~kds.store.Delete`, maybe with an expectation, maybe ``missing_ok``.

    Args:
        keys: where keys come from (default :func:`resource_keys`).
        versions: the stored version of each key, as for :func:`upserts`.
        conditional: when False, the delete can never fail: no expectation and
            ``missing_ok``.
    """
    return _deletes(keys if keys is not None else resource_keys(), versions, conditional)


@st.composite
def _deletes(
    draw: st.DrawFn,
    keys: SearchStrategy[ResourceKey],
    versions: Mapping[ResourceKey, int] | None,
    conditional: bool,
) -> Delete:
    key = draw(keys)
    if not conditional:
        return Delete(key=key, missing_ok=True)
    expected = draw(expected_versions(None if versions is None else versions.get(key, 0)))
    return Delete(key=key, expected_version=expected, missing_ok=draw(st.booleans()))


def changes(
    *,
    keys: SearchStrategy[ResourceKey] | None = None,
    versions: Mapping[ResourceKey, int] | None = None,
    conditional: bool = True,
    catalog: Catalog = DEFAULT_CATALOG,
    rich: bool = True,
) -> SearchStrategy[Change]:
    """An upsert (more often) or a delete; see :func:`upserts` and :func:`deletes`."""
    upsert = upserts(
        keys=keys, versions=versions, conditional=conditional, catalog=catalog, rich=rich
    )
    delete = deletes(keys=keys, versions=versions, conditional=conditional)
    return st.one_of(upsert, upsert, delete)


def batches(
    *,
    min_size: int = 0,
    max_size: int = 4,
    keys: SearchStrategy[ResourceKey] | None = None,
    versions: Mapping[ResourceKey, int] | None = None,
    conditional: bool = True,
    catalog: Catalog = DEFAULT_CATALOG,
    rich: bool = True,
) -> SearchStrategy[list[Change]]:
    """A list of :func:`changes` for one commit (may touch a key more than once).

    With *conditional* (the default) a batch may fail: a stale expected version
    or a delete of a missing key without ``missing_ok``.
    """
    return st.lists(
        changes(keys=keys, versions=versions, conditional=conditional, catalog=catalog, rich=rich),
        min_size=min_size,
        max_size=max_size,
    )


def consistent_batches(
    view: Mapping[ResourceKey, Resource],
    *,
    min_size: int = 1,
    max_size: int = 4,
    keys: SearchStrategy[ResourceKey] | None = None,
    catalog: Catalog = DEFAULT_CATALOG,
    rich: bool = True,
) -> SearchStrategy[list[Change]]:
    """A batch that commits on top of *view*: every expectation it states holds.

    Each change either states no expectation or the exact version the earlier
    changes of the batch leave (an identical upsert leaves the version alone);
    deletes of missing resources are ``missing_ok`` or expect
    :data:`MUST_NOT_EXIST`. Use it next to :func:`batches`, whose expectations
    are often stale, to get long histories of successful commits.

    Args:
        view: the stored resources by key.
        min_size: fewest changes.
        max_size: most changes.
        keys: where keys come from (default :func:`resource_keys`).
        catalog: the catalog specs must satisfy.
        rich: as for :func:`specs`.
    """
    return _consistent_batches(
        view,
        min_size,
        max_size,
        keys if keys is not None else resource_keys(catalog=catalog),
        catalog,
        rich,
    )


def _encoded(value: Mapping[str, Any]) -> bytes:
    # The encoding Store.commit compares to decide whether an upsert changes anything.
    return msgpack.packb(value, use_bin_type=True)


@st.composite
def _consistent_batches(
    draw: st.DrawFn,
    view: Mapping[ResourceKey, Resource],
    min_size: int,
    max_size: int,
    keys: SearchStrategy[ResourceKey],
    catalog: Catalog,
    rich: bool,
) -> list[Change]:
    # key -> (version, encoded labels, encoded spec) as the batch so far leaves it
    state = {
        key: (resource.version, _encoded(resource.labels), _encoded(resource.spec))
        for key, resource in view.items()
    }
    batch: list[Change] = []
    for _ in range(draw(st.integers(min_size, max_size))):
        key = draw(keys)
        current = state.get(key)
        version = current[0] if current else 0
        if draw(st.integers(0, 2)):
            labels_ = draw(labels())
            spec = draw(specs(key.type, catalog=catalog, rich=rich))
            expected = draw(st.sampled_from([None, version]))
            batch.append(Upsert(key=key, labels=labels_, spec=spec, expected_version=expected))
            blobs = (_encoded(labels_), _encoded(spec))
            if current is None or current[1:] != blobs:
                state[key] = (version + 1, *blobs)
        elif current is None:
            missing_ok = draw(st.booleans())
            expected = MUST_NOT_EXIST if not missing_ok else draw(st.sampled_from([None, 0]))
            batch.append(Delete(key=key, expected_version=expected, missing_ok=missing_ok))
        else:
            expected = draw(st.sampled_from([None, version]))
            batch.append(Delete(key=key, expected_version=expected, missing_ok=draw(st.booleans())))
            del state[key]
    return batch


def trackings(
    *,
    origins: Sequence[str] = ORIGINS,
    epochs: Sequence[str] = EPOCHS,
    max_revision: int = 6,
) -> SearchStrategy[Tracking]:
    """Tracking cursors over small pools, so that replays (conflicts) are frequent."""
    return st.builds(
        Tracking,
        st.sampled_from(origins),
        st.builds(Cursor, st.sampled_from(epochs), st.integers(0, max_revision)),
    )


def wide_trackings() -> SearchStrategy[Tracking]:
    """Tracking cursors that are valid but unusual, mixed with :func:`trackings`.

    Origins and epochs may be any non-empty text (control characters and
    non-ASCII included) and revisions any int >= 0, including ones too large
    for a 64-bit column: the contract accepts them all.
    """
    text = st.text(min_size=1, max_size=12)
    unusual = st.builds(
        Tracking,
        text,
        st.builds(Cursor, text, st.integers(0, 2**64) | st.integers(2**63 - 2, 2**80)),
    )
    return trackings() | unusual


@attrs.frozen
class InvalidChange:
    """A change :meth:`~kds.store.Store.commit` must refuse with a ValidationError.

    Attributes:
        change: the malformed change (or something that is not a change at all).
        field: the start of the error's field below ``changes[i]``: ``"key.type"``,
            ``"labels"``, ``"spec.enabled"``, ... or ``""`` when the element itself
            is wrong.
    """

    change: Any
    field: str


def _loose(value: object) -> Any:
    # Malformed input is the point here: hide it from the type checker.
    return cast("Any", value)


def invalid_changes() -> SearchStrategy[InvalidChange]:
    """Changes that break each rule of :meth:`~kds.store.Store.commit` validation.

    Unknown type, wrong scope, malformed names, bad labels, specs the type's
    validator refuses, specs msgpack cannot encode (or cannot decode again), bad
    expected versions, and elements that are not changes. Keys are from the
    default catalog.
    """
    name = st.sampled_from(NAMES)
    mesh_key = st.builds(ResourceKey, st.just("Dataplane"), st.just("default"), name)
    global_key = st.builds(ResourceKey, st.just("Mesh"), st.none(), name)
    good_key = mesh_key | global_key
    bad_keys: list[SearchStrategy[tuple[ResourceKey, str]]] = [
        st.builds(ResourceKey, st.just("NoSuchType"), st.none(), name).map(
            lambda key: (key, "key.type")
        ),
        st.builds(ResourceKey, st.just("Dataplane"), st.none(), name).map(
            lambda key: (key, "key.mesh")
        ),
        st.builds(ResourceKey, st.just("Zone"), st.just("default"), name).map(
            lambda key: (key, "key.mesh")
        ),
        st.builds(ResourceKey, st.just("Dataplane"), st.just("bad mesh"), name).map(
            lambda key: (key, "key.mesh")
        ),
        st.sampled_from(["", "has space", "tab\there", "x" * (MAX_NAME_LENGTH + 1)]).map(
            lambda bad: (ResourceKey("Mesh", None, bad), "key.name")
        ),
    ]
    bad_key = st.one_of(bad_keys)
    bad_labels = st.sampled_from(
        [
            ({"": "x"}, "labels"),
            ({"team": 1}, "labels.team"),
            ({"team": None}, "labels.team"),
            (["team"], "labels"),
            ({"team": "\ud800"}, "labels"),  # a lone surrogate cannot be encoded
        ]
    )
    bad_specs = st.sampled_from(
        [
            ("Mesh", {"x": object()}, "spec"),
            ("Mesh", {"x": 2**64}, "spec"),
            ("Mesh", {"x": {1: "integer key"}}, "spec"),
            ("Mesh", {"x": {"y": {1.5: "float key"}}}, "spec"),
            ("Mesh", {1: "x"}, "spec"),
            ("Mesh", ["not", "a", "mapping"], "spec"),
            ("Mesh", {"mtls": "on"}, "spec.mtls"),
            ("Zone", {"enabled": "yes"}, "spec.enabled"),
            ("Zone", {"enabled": 1}, "spec.enabled"),
        ]
    )
    bad_versions = st.sampled_from([-1, True, False, "1", 1.0])

    def bad_key_upsert(pair: tuple[ResourceKey, str]) -> InvalidChange:
        return InvalidChange(Upsert(key=pair[0]), pair[1])

    def bad_key_delete(pair: tuple[ResourceKey, str]) -> InvalidChange:
        return InvalidChange(Delete(key=pair[0]), pair[1])

    def bad_label_upsert(key: ResourceKey, pair: tuple[Any, str]) -> InvalidChange:
        return InvalidChange(Upsert(key=key, labels=_loose(pair[0])), pair[1])

    def bad_spec_upsert(name_: str, case: tuple[str, Any, str]) -> InvalidChange:
        type_name, spec, field = case
        return InvalidChange(Upsert(key=ResourceKey(type_name, None, name_), spec=spec), field)

    def bad_version(key: ResourceKey, version: Any, delete: bool) -> InvalidChange:
        change: Change = (
            Delete(key=key, expected_version=version)
            if delete
            else Upsert(key=key, expected_version=version)
        )
        return InvalidChange(change, "expected_version")

    return st.one_of(
        bad_key.map(bad_key_upsert),
        bad_key.map(bad_key_delete),
        st.builds(bad_label_upsert, good_key, bad_labels),
        st.builds(bad_spec_upsert, name, bad_specs),
        st.builds(bad_version, good_key, bad_versions, st.booleans()),
        st.sampled_from(["not a change", None, 42, Tracking("o", Cursor("e", 1))]).map(
            lambda thing: InvalidChange(thing, "")
        ),
    )


def invalid_trackings() -> SearchStrategy[tuple[Tracking, str]]:
    """Malformed tracking cursors, each with the field its ValidationError names."""
    return st.sampled_from(
        [
            (Tracking("", Cursor("epoch-a", 1)), "tracking.origin"),
            (Tracking(_loose(None), Cursor("epoch-a", 1)), "tracking.origin"),
            (Tracking("global", Cursor("", 1)), "tracking.cursor.epoch"),
            (Tracking("global", Cursor(_loose(7), 1)), "tracking.cursor.epoch"),
            (Tracking("global", Cursor("epoch-a", -1)), "tracking.cursor.revision"),
            (Tracking("global", Cursor("epoch-a", _loose(True))), "tracking.cursor.revision"),
            (Tracking("global", Cursor("epoch-a", _loose("3"))), "tracking.cursor.revision"),
        ]
    )
