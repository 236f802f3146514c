"""kds: replicate resources between a global control plane and many zones.

Every store is an event log plus a view; replication is a versioned event stream
from one store's log into another, resumable from a cursor.
"""

from kds._registry import store_class as store_class
from kds.catalog import DEFAULT_CATALOG as DEFAULT_CATALOG
from kds.catalog import optional_fields as optional_fields
from kds.codec import Codec as Codec
from kds.errors import CompactedError as CompactedError
from kds.errors import ConfigError as ConfigError
from kds.errors import ConflictError as ConflictError
from kds.errors import ConnectError as ConnectError
from kds.errors import CursorAheadError as CursorAheadError
from kds.errors import DecodeError as DecodeError
from kds.errors import EpochMismatchError as EpochMismatchError
from kds.errors import FrameTooLargeError as FrameTooLargeError
from kds.errors import KdsError as KdsError
from kds.errors import NotFoundError as NotFoundError
from kds.errors import ProtocolError as ProtocolError
from kds.errors import SessionClosedError as SessionClosedError
from kds.errors import StoreClosedError as StoreClosedError
from kds.errors import StoreError as StoreError
from kds.errors import StoreUnavailableError as StoreUnavailableError
from kds.errors import TransportError as TransportError
from kds.errors import ValidationError as ValidationError
from kds.errors import VersionMismatchError as VersionMismatchError
from kds.resource import LABEL_DISPLAY_NAME as LABEL_DISPLAY_NAME
from kds.resource import LABEL_K8S_NAMESPACE as LABEL_K8S_NAMESPACE
from kds.resource import LABEL_KDS_SYNC as LABEL_KDS_SYNC
from kds.resource import LABEL_ORIGIN as LABEL_ORIGIN
from kds.resource import LABEL_POLICY_ROLE as LABEL_POLICY_ROLE
from kds.resource import LABEL_ZONE as LABEL_ZONE
from kds.resource import ORIGIN_GLOBAL as ORIGIN_GLOBAL
from kds.resource import ORIGIN_ZONE as ORIGIN_ZONE
from kds.resource import Catalog as Catalog
from kds.resource import Resource as Resource
from kds.resource import ResourceKey as ResourceKey
from kds.resource import ResourceType as ResourceType
from kds.resource import Scope as Scope
from kds.resource import SyncFlag as SyncFlag
from kds.resource import hashed_name as hashed_name
from kds.resource import sync_name as sync_name
from kds.store import MUST_NOT_EXIST as MUST_NOT_EXIST
from kds.store import Atomicity as Atomicity
from kds.store import Change as Change
from kds.store import Cursor as Cursor
from kds.store import Delete as Delete
from kds.store import Deleted as Deleted
from kds.store import Event as Event
from kds.store import Snapshot as Snapshot
from kds.store import Store as Store
from kds.store import Tracking as Tracking
from kds.store import Upsert as Upsert
from kds.store import Upserted as Upserted
from kds.transport import DEFAULT_MAX_FRAME_SIZE as DEFAULT_MAX_FRAME_SIZE
from kds.transport import PeerInfo as PeerInfo
from kds.transport import Session as Session
from kds.transport import SessionHandler as SessionHandler
from kds.transport import Transport as Transport

__version__ = "0.1.0"
