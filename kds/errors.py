"""The kds error hierarchy: every error kds raises is a :class:`KdsError`.

Backends translate driver errors at their boundary (``raise X(...) from exc``), so
callers and the conformance suite only ever see these classes. Retryability is a
class, not a flag: ``except StoreUnavailableError`` is a retry policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kds.resource import ResourceKey

__all__ = [
    "CompactedError",
    "ConfigError",
    "ConflictError",
    "CursorAheadError",
    "DecodeError",
    "EpochMismatchError",
    "KdsError",
    "NotFoundError",
    "StoreClosedError",
    "StoreError",
    "StoreUnavailableError",
    "ValidationError",
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
