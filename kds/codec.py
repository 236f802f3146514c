"""The msgpack codec for kds value objects, built on one cattrs converter.

Encoding is plain cattrs unstructuring into msgpack. Decoding is strict: a field
of the wrong type is an error (stock cattrs would turn ``5`` into ``"5"`` and
``"false"`` into ``True``), resources are checked against the catalog, and every
failure -- truncated or oversized input, bad msgpack, wrong types, missing fields,
unknown resource types, specs the type refuses -- is a :class:`DecodeError` whose
message names the field. Unknown extra fields are ignored so that an older peer
can read what a newer one writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import cattrs
import msgpack
from cattrs.preconf.msgpack import make_converter
from cattrs.strategies import configure_tagged_union

from kds.catalog import DEFAULT_CATALOG
from kds.errors import DecodeError, KdsError, ValidationError
from kds.resource import Catalog, Resource, ResourceKey, validate_labels
from kds.store import Cursor, Deleted, Event, Tracking, Upserted

__all__ = ["DEFAULT_MAX_SIZE", "Codec", "strict_converter", "unpack"]

T = TypeVar("T")

DEFAULT_MAX_SIZE: Final = 4 * 1024 * 1024  # bytes; a single encoded object, not a stream

_EVENT_TAGS: Final = {Upserted: "upserted", Deleted: "deleted"}


def _strict(expected: type, name: str) -> Any:
    def structure(value: object, _: type) -> object:
        # bool is an int subclass; a boolean where a number is due is a type error.
        if isinstance(value, expected) and not (expected is not bool and isinstance(value, bool)):
            return value
        raise TypeError(f"expected {name}, got {type(value).__name__}")

    return structure


def _structure_float(value: object, _: type) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def _structure_datetime(value: object, _: type) -> datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    raise TypeError(f"expected a timestamp, got {type(value).__name__}")


def _structure_spec(value: object, _: type) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping, got {type(value).__name__}")
    return value


def _make_converter() -> cattrs.Converter:
    converter = make_converter(detailed_validation=True, forbid_extra_keys=False)
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(int, _strict(int, "an integer"))
    converter.register_structure_hook(bool, _strict(bool, "a boolean"))
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(datetime, _structure_datetime)
    converter.register_unstructure_hook(datetime, lambda moment: moment.timestamp())
    # Specs are free-form msgpack maps; the resource type's validator checks them.
    converter.register_structure_hook_func(lambda cls: cls == Mapping[str, Any], _structure_spec)
    configure_tagged_union(
        Upserted | Deleted,
        converter,
        tag_name="kind",
        tag_generator=lambda cls: _EVENT_TAGS[cls],
    )
    return converter


_CONVERTER: Final = _make_converter()


def unpack(data: bytes, what: str, error: type[KdsError]) -> Any:
    """Unpack exactly one msgpack value from *data*, or raise *error* naming *what*.

    Maps must have string keys; trailing bytes after the value are an error too.
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise error(f"trailing bytes after a {what}: {exc}") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise error(f"{what} is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def strict_converter() -> cattrs.Converter:
    """A copy of the codec's strict converter, for formats built on top of it.

    The protocol's frames carry resources, events and cursors in exactly the shape
    :class:`Codec` gives them; building on a copy keeps the two from drifting, and
    changes to the copy do not affect the codec.
    """
    return _CONVERTER.copy()


def _name_of(cls: object) -> str:
    return "Event" if cls == Event else getattr(cls, "__name__", repr(cls))


class Codec:
    """Encodes kds value objects to msgpack and decodes them strictly.

    Args:
        catalog: the resource types decoded resources must belong to.
        max_size: largest input :meth:`decode` accepts, in bytes.
    """

    def __init__(
        self, catalog: Catalog = DEFAULT_CATALOG, *, max_size: int = DEFAULT_MAX_SIZE
    ) -> None:
        self.catalog = catalog
        self.max_size = max_size

    def unstructure(self, value: object) -> Any:
        """Turn *value* (a kds attrs class, or a union member) into msgpack-able data."""
        if isinstance(value, Upserted | Deleted):
            return _CONVERTER.unstructure(value, Event)
        return _CONVERTER.unstructure(value)

    def encode(self, value: object) -> bytes:
        """Encode *value* to msgpack bytes.

        Raises:
            ValueError: *value* holds something msgpack cannot represent.
        """
        try:
            return msgpack.packb(self.unstructure(value), use_bin_type=True)
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"cannot encode {type(value).__name__}: {exc}") from exc

    def structure(self, data: object, cls: type[T]) -> T:
        """Build a *cls* from already-unpacked *data*, with the checks of :meth:`decode`.

        Raises:
            DecodeError: naming the first bad field as a ``$.path``.
        """
        name = _name_of(cls)
        if not isinstance(data, Mapping):
            raise DecodeError(f"invalid {name}: expected a mapping, got {type(data).__name__} @ $")
        if cls == Event and data.get("kind") not in _EVENT_TAGS.values():
            raise DecodeError(
                f"invalid Event: unknown kind {data.get('kind')!r}, expected one of "
                f"{sorted(_EVENT_TAGS.values())} @ $.kind"
            )
        try:
            value: T = _CONVERTER.structure(data, cls)
        except cattrs.BaseValidationError as exc:
            reasons = "; ".join(cattrs.transform_error(exc))
            raise DecodeError(f"invalid {name}: {reasons}") from exc
        except Exception as exc:  # cattrs raises whatever a hook raised
            raise DecodeError(f"invalid {name}: {exc}") from exc
        self._check(value, name)
        return value

    def decode(self, data: bytes, cls: type[T]) -> T:
        """Decode msgpack *data* into a *cls* (``Resource``, ``Event``, ``Cursor``, ...).

        Raises:
            DecodeError: the input is too large, not one complete msgpack value, or
                not a valid *cls*; the message names the field.
        """
        name = _name_of(cls)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes to decode, got {type(data).__name__}")
        if len(data) > self.max_size:
            raise DecodeError(
                f"{name} of {len(data)} bytes exceeds the limit of {self.max_size} bytes"
            )
        return self.structure(unpack(data, name, DecodeError), cls)

    def decode_event(self, data: bytes) -> Event:
        """Decode an :data:`~kds.store.Event` (either kind) from msgpack *data*.

        Raises:
            DecodeError: as :meth:`decode`.
        """
        return self.decode(data, Event)  # type: ignore[arg-type]  # a union is a valid target

    def _check(self, value: object, root: str) -> None:
        """Apply the catalog's checks to every resource and key inside *value*."""
        try:
            if isinstance(value, Resource):
                self._check_resource(value)
            elif isinstance(value, Upserted):
                self._check_resource(value.resource)
            elif isinstance(value, Deleted):
                self.catalog.validate_key(value.key)
                validate_labels(value.labels)
                if value.version < 1:
                    raise ValidationError("version", f"must be >= 1, got {value.version}")
            elif isinstance(value, ResourceKey):
                self.catalog.validate_key(value)
                return
        except ValidationError as exc:
            if isinstance(value, ResourceKey):
                path = exc.field.removeprefix("key.")
            elif isinstance(value, Upserted):
                path = f"resource.{exc.field}"
            else:
                path = exc.field
            raise DecodeError(f"invalid {root}: {exc.reason} @ $.{path}") from exc
        if isinstance(value, Upserted | Deleted | Cursor | Tracking):
            revision = value.cursor.revision if isinstance(value, Tracking) else value.revision
            if revision < 0:
                raise DecodeError(f"invalid {root}: revision must be >= 0 @ $.revision")

    def _check_resource(self, resource: Resource) -> None:
        resource_type = self.catalog.validate_key(resource.key)
        validate_labels(resource.labels)
        resource_type.validate_spec(resource.spec)
        if resource.version < 1:
            raise ValidationError("version", f"must be >= 1, got {resource.version}")
