"""The kds error hierarchy: every error kds raises is a :class:`KdsError`.

Backends translate driver errors at their boundary (``raise X(...) from exc``), so
callers and the conformance suite only ever see these classes. Retryability is a
class, not a flag: ``except StoreUnavailableError`` is a retry policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kds.resource import ResourceKey

__all__ = [
    "CompactedError",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "CursorAheadError",
    "DecodeError",
    "EpochMismatchError",
    "FrameTooLargeError",
    "KdsError",
    "NotFoundError",
    "ProtocolError",
    "SessionClosedError",
    "StoreClosedError",
    "StoreError",
    "StoreUnavailableError",
    "TransportError",
    "ValidationError",
    "VersionMismatchError",
]


class KdsError(Exception):
    """Root of every error kds raises."""


class ConfigError(KdsError, ValueError):
    """Raised when configuration is missing, malformed or names an unavailable backend."""


class ValidationError(KdsError, ValueError):
    """Raised when a resource or change is invalid; the message names the bad field.

    Attributes:
        field: dotted path of the offending field (``"key.name"``, ``"spec.enabled"``).
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class DecodeError(KdsError, ValueError):
    """Raised when bytes cannot be decoded into a kds object.

    Covers truncated or oversized input, invalid msgpack, wrong field types,
    missing fields and unknown resource type names. The message names the field
    (``$.key.type``) whenever the input got far enough to have fields.
    """


class StoreError(KdsError):
    """Base of the errors a :class:`kds.Store` raises."""


class ConflictError(StoreError):
    """Raised when a commit's expected version does not match the stored one.

    The whole batch was rejected: nothing was written and no event was emitted.

    Attributes:
        key: the first resource whose expectation failed (``None`` for tracking conflicts).
        expected: the version the caller expected (0 = must not exist).
        actual: the stored version (0 = does not exist).
    """

    def __init__(
        self,
        message: str,
        *,
        key: ResourceKey | None = None,
        expected: int | None = None,
        actual: int | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.expected = expected
        self.actual = actual


class NotFoundError(StoreError, LookupError):
    """Raised when a resource that must exist does not.

    Attributes:
        key: the missing resource's key.
    """

    def __init__(self, key: ResourceKey) -> None:
        super().__init__(f"resource not found: {key}")
        self.key = key


class StoreUnavailableError(StoreError):
    """Raised when the backend cannot be reached or is busy; the operation is safe to retry.

    A commit that raised this either fully happened or did not happen at all; use
    expected versions or a tracking cursor to find out which.
    """


class StoreClosedError(StoreError):
    """Raised when a store is used before it was opened or after it was closed."""


class CompactedError(StoreError):
    """Raised when reading events from before the store's compaction horizon.

    The reader must fall back to a snapshot (the Kubernetes "410 Gone").

    Attributes:
        after: the revision the reader asked to continue after.
        horizon: the oldest revision a reader may continue after.
    """

    def __init__(self, after: int, horizon: int) -> None:
        super().__init__(
            f"events after revision {after} were compacted; "
            f"the log now starts after revision {horizon}: take a snapshot"
        )
        self.after = after
        self.horizon = horizon


class EpochMismatchError(StoreError):
    """Raised when a cursor comes from another log than this store's.

    The store was wiped, restored or replaced since the cursor was taken, so its
    revision means nothing here; the reader must fall back to a snapshot.

    Attributes:
        expected: this store's epoch.
        actual: the cursor's epoch.
    """

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"cursor belongs to log epoch {actual!r}, this store's epoch is "
            f"{expected!r}: take a snapshot"
        )
        self.expected = expected
        self.actual = actual


class CursorAheadError(EpochMismatchError):
    """Raised when a cursor of this epoch is past the log's head.

    The data was restored from a copy older than the cursor, so events the reader
    holds may not exist here; the reader must fall back to a snapshot.

    Attributes:
        revision: the cursor's revision.
        head: this log's head.
    """

    def __init__(self, epoch: str, revision: int, head: int) -> None:
        StoreError.__init__(
            self,
            f"cursor at revision {revision} is ahead of this log's head {head} in epoch "
            f"{epoch!r}: the store was restored from an older copy; take a snapshot",
        )
        self.expected = epoch
        self.actual = epoch
        self.revision = revision
        self.head = head


class TransportError(KdsError):
    """Base of the errors a :class:`kds.Transport` or its sessions raise.

    Every one of them ends the session it happened in (or prevents it); the sync
    engine reacts to all of them the same way: reconnect with backoff.
    """


class ConnectError(TransportError):
    """Raised when a zone cannot open a session to the global; safe to retry.

    The global is down, unreachable, refused the connection, or the transport's
    handshake (TLS, for example) failed.

    Attributes:
        address: where the zone tried to connect.
        reason: why it failed.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot connect to {address}: {reason}")
        self.address = address
        self.reason = reason


class SessionClosedError(TransportError):
    """Raised when a session is used after it ended.

    ``by_peer`` tells who ended it: ``True`` when the other side closed it or the
    connection was lost (after frames the peer sent before closing were all
    received), ``False`` when this side closed it with ``aclose()``.

    Attributes:
        reason: the reason given by whoever ended the session (may be empty).
        by_peer: whether the session was ended by the other side or the network.
    """

    def __init__(self, reason: str, *, by_peer: bool) -> None:
        who = "remotely" if by_peer else "locally"
        super().__init__(f"session was closed {who}" + (f": {reason}" if reason else ""))
        self.reason = reason
        self.by_peer = by_peer


class FrameTooLargeError(TransportError, ValueError):
    """Raised when a frame (or an item that must fit in one) exceeds the frame size limit.

    Nothing was sent; the session is still usable.

    Attributes:
        size: the frame's (or item's) size in bytes.
        limit: the largest frame allowed, in bytes.
    """

    def __init__(self, size: int, limit: int, *, what: str = "frame") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the frame size limit of {limit} bytes")
        self.size = size
        self.limit = limit


class ProtocolError(TransportError):
    """Raised when the peer broke the sync protocol.

    It sent a frame that cannot be decoded, or one that is not allowed at this
    point of the session (see ``docs/protocol.md``). The session must end; the
    frame was not applied.

    Attributes:
        reason: what was wrong; decoding errors name the field (``@ $.events[3].revision``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VersionMismatchError(ProtocolError):
    """Raised when a zone and the global have no protocol version in common.

    Attributes:
        offered: the major versions the zone speaks.
        supported: the major versions this side speaks.
    """

    def __init__(self, offered: Sequence[int], supported: Sequence[int]) -> None:
        if offered and supported and max(offered) > max(supported):
            advice = "upgrade the global: a zone must never be newer than its global"
        else:
            advice = "upgrade the zone"
        super().__init__(
            f"no common protocol version: the zone speaks {sorted(offered)}, the global "
            f"speaks {sorted(supported)}; {advice}"
        )
        self.offered = tuple(offered)
        self.supported = tuple(supported)
