"""The Kubernetes store: resources as custom resources, the log as the API server's watches.

:class:`KubernetesStore` keeps every resource as an object of its type's CRD
(:mod:`kds.k8s`) in one namespace, through ``kubernetes_asyncio`` -- the official
client's asyncio port, generated from the same OpenAPI document, on aiohttp (which
kds already uses), and able to load a kubeconfig or a pod's service account.

How the Store contract maps onto Kubernetes:

* **Revisions are resourceVersions.** Kubernetes numbers every write in the cluster
  from one counter (etcd's revision), so the revision of an event is the
  resourceVersion its write produced -- strictly increasing in commit order, not
  dense (other objects' writes take numbers too).
* **The log is the merge of one watch per type.** A watch delivers one collection's
  events in order; the store releases an event only once every other type's watch
  has shown, by an event or a *bookmark*, that it has nothing older to deliver. So
  followers never see events out of order, however the watches interleave. Watches
  end after ``watch_timeout`` seconds and are opened again from where they were.
* **Compaction.** etcd drops old revisions on its own; a watch from a revision it no
  longer has answers ``410 Gone``, which becomes :class:`~kds.errors.CompactedError`
  (the follower takes a snapshot). When the store's own tail meets 410 it relists:
  the log continues from the current revision and the horizon moves there.
  :meth:`~KubernetesStore.compact` keeps a horizon of its own as well, in the
  ``kds-store`` ConfigMap.
* **Conflicts.** Every write carries the resourceVersion it was based on, so a write
  that lost a race gets ``409 Conflict``, which becomes
  :class:`~kds.errors.ConflictError`.
* **Epoch.** A hash of the ``kube-system`` namespace's uid (the cluster's identity),
  the store namespace's uid and the API group: a new cluster, a recreated namespace
  or another group is another log.
* **Tracking cursors** are ConfigMaps (``kds-tracking-<hash>``), one per origin.

Kubernetes has no multi-object transactions, so this store's commits are not atomic
(:attr:`~kds.store.Atomicity.ORDERED_PREFIX`): a commit checks every expected version,
the tracking rule and every spec before writing anything, then writes its changes one
by one, in order, and the tracking cursor last. A commit interrupted half-way (a
crash, a lost connection, a concurrent writer winning a race) leaves a prefix of its
changes applied and the cursor where it was. Replication stays exactly-once in
effect: the cursor did not move, so the batch is received again, and re-applying it
finds the applied part identical (an identical upsert writes nothing) or already
deleted. ``docs/kubernetes.md`` says what this means for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import inspect
import itertools
import json
import logging
import random
import re
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, cast

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from kds.catalog import DEFAULT_CATALOG
from kds.errors import (
    CompactedError,
    ConfigError,
    ConflictError,
    NotFoundError,
    StoreClosedError,
    StoreUnavailableError,
    ValidationError,
)
from kds.k8s import (
    ANNOTATION_DIGEST,
    DEFAULT_GROUP,
    DEFAULT_NAMESPACE,
    DEFAULT_VERSION,
    crd_manifest,
    crd_name,
    digest,
    from_object,
    is_label,
    object_name,
    plural,
    to_object,
)
from kds.resource import Resource, ResourceKey
from kds.store import (
    DEFAULT_READ_LIMIT,
    Atomicity,
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
    from collections.abc import AsyncGenerator, Collection, Mapping, Sequence

    from kds.resource import Catalog

__all__ = ["KubernetesStore"]

logger = logging.getLogger(__name__)

_META_CONFIGMAP: Final = "kds-store"
_TRACKING_PREFIX: Final = "kds-tracking-"
_TRACKING_LABEL: Final = "kds.kuma.io/tracking"
_PAGE_SIZE: Final = 500
_GET_ONE_BY_ONE: Final = 8  # more keys of one type than this: one list instead of GETs
_PARALLEL_REQUESTS: Final = 16
_ESTABLISH_TIMEOUT: Final = 60.0  # seconds for a new CRD to be served
_RETRY_FIRST: Final = 0.1
_RETRY_MAX: Final = 5.0
_PART_OF_KDS: Final = {"app.kubernetes.io/part-of": "kds"}
_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _status(exc: ApiException) -> int:
    status: int = exc.status or 0
    return status


def _message(exc: ApiException) -> str:
    """The Status message the API server sent, or the HTTP reason."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or f"HTTP {exc.status}")


def _revision(value: object) -> int:
    """A resourceVersion as the int it is in every Kubernetes (etcd's revision)."""
    try:
        return int(str(value))
    except ValueError:
        raise StoreUnavailableError(
            f"the API server sent resourceVersion {value!r}, which is not a number: "
            "this store needs an etcd-backed API server"
        ) from None


class _Merger:
    """Merges one watch per type into one stream of events in revision order.

    Each type's *progress* is the revision up to which its watch has delivered
    everything (its last event or bookmark). Events wait in a heap until the
    lowest progress passes them: only then can no older event still arrive.
    """

    def __init__(
        self, store: KubernetesStore, start: int, *, keep: int | None, head: int = 0
    ) -> None:
        self.store = store
        self.start = start
        self.keep = keep
        self.progress = dict.fromkeys(store._plurals, start)
        self.watermark = start
        # (revision, arrival, event): arrival breaks ties, events do not compare.
        self.pending: list[tuple[int, int, Event]] = []
        self.arrivals = itertools.count()
        self.released: deque[Event] = deque()
        self.released_after = start  # every event after this is in `released`
        self.last_event = head  # the head: the last event released (or known before start)
        self.failure: BaseException | None = None
        self.changed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def run(self) -> None:
        self.tasks = [
            asyncio.create_task(self._watch(type_name), name=f"kds-k8s-watch-{type_name}")
            for type_name in self.progress
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks = []

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _fail(self, failure: BaseException) -> None:
        if self.failure is None:
            self.failure = failure
        self._wake()

    def _advance(self, type_name: str, revision: int, event: Event | None) -> None:
        if event is not None:
            heapq.heappush(self.pending, (revision, next(self.arrivals), event))
        if revision <= self.progress[type_name]:
            return
        self.progress[type_name] = revision
        watermark = min(self.progress.values())
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        while self.pending and self.pending[0][0] <= watermark:
            released = heapq.heappop(self.pending)[2]
            self.released.append(released)
            self.last_event = released.revision
        if self.keep is not None:
            while len(self.released) > self.keep:
                self.released_after = self.released.popleft().revision
        self._wake()

    async def _watch(self, type_name: str) -> None:
        store = self.store
        delay = _RETRY_FIRST
        while True:
            try:
                async for revision, event in store._watch_stream(
                    type_name, self.progress[type_name]
                ):
                    delay = _RETRY_FIRST
                    self._advance(type_name, revision, event)
            except CompactedError as exc:
                if self.keep is not None:
                    # The live tail fell behind etcd's compaction: relist.
                    self.store._relist(self)
                self._fail(exc)
                return
            except StoreUnavailableError as exc:
                logger.warning("%s: watch of %s failed, retrying: %s", store, type_name, exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 -- jitter
                delay = min(delay * 2, _RETRY_MAX)

    async def wait_until(self, revision: int) -> None:
        """Return once every event up to *revision* is released."""
        while self.watermark < revision:
            if self.failure is not None:
                raise self.failure
            await self.changed.wait()

    def after(self, revision: int, limit: int) -> list[Event]:
        """Released events after *revision* (which must be at or after ``released_after``)."""
        events: list[Event] = []
        # Released events are few enough that a scan from the right end is cheap
        # for a follower near the head, which is where followers spend their time.
        index = len(self.released)
        while index > 0 and self.released[index - 1].revision > revision:
            index -= 1
        for event in itertools.islice(self.released, index, None):
            events.append(event)
            if len(events) == limit:
                break
        return events


class KubernetesStore(Store):
    """Resources as Kubernetes custom resources; the log read from the API server's watches.

    Args:
        namespace: the namespace holding the store's objects (created if missing).
            Control planes sharing it share one store.
        group: the CRDs' API group.
        version: the CRDs' version.
        kubeconfig: a kubeconfig file; ``None`` uses the pod's service account in a
            cluster, else ``~/.kube/config``.
        context: the kubeconfig context; ``None`` for its current context.
        watch_timeout: seconds a watch lasts before it is opened again; the API server
            sends a bookmark shortly before a watch ends, which bounds how long a quiet
            type holds back the merged log.
        request_timeout: seconds one request may take before the operation fails
            with :class:`~kds.errors.StoreUnavailableError`.
        window: how many recent events the store keeps in memory for followers; older
            reads open watches from the revision asked for.
        catalog: the resource types; each becomes a CRD (its name must be a valid
            Kubernetes kind).

    Raises:
        ConfigError: the namespace is not a DNS label, the group is not a DNS
            subdomain, a type's name cannot be a kind, or a number is out of range.
    """

    atomicity = Atomicity.ORDERED_PREFIX

    def __init__(
        self,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        group: str = DEFAULT_GROUP,
        version: str = DEFAULT_VERSION,
        kubeconfig: str | None = None,
        context: str | None = None,
        watch_timeout: float = 10.0,
        request_timeout: float = 30.0,
        window: int = 10_000,
        catalog: Catalog = DEFAULT_CATALOG,
    ) -> None:
        super().__init__(catalog=catalog)
        if not _DNS_LABEL.fullmatch(namespace) or len(namespace) > 63:
            raise ConfigError(f"Kubernetes namespace {namespace!r} is not a DNS label")
        if not _DNS_LABEL.fullmatch(version):
            raise ConfigError(f"CRD version {version!r} is not a DNS label")
        if watch_timeout < 1 or request_timeout <= 0 or window < 1:
            raise ConfigError(
                "watch_timeout must be at least 1 s, request_timeout positive, window >= 1"
            )
        self._crds = {t.name: crd_manifest(t, group=group, version=version) for t in catalog}
        self._plurals = {t.name: plural(t.name) for t in catalog}
        self._namespace = namespace
        self._group = group
        self._version = version
        self._kubeconfig = kubeconfig
        self._context = context
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._window = window
        self._api: k8s.ApiClient | None = None
        self._custom: k8s.CustomObjectsApi | None = None
        self._core: k8s.CoreV1Api | None = None
        self._epoch: str | None = None
        self._tail: _Merger | None = None
        self._horizon = 0
        self._lost = 0  # where the tail relisted after etcd compacted what it needed
        self._floor = 0  # the store's creation: no event of it is older
        self._background: set[asyncio.Task[None]] = set()
        self._commit_lock = asyncio.Lock()
        self._limit = asyncio.Semaphore(_PARALLEL_REQUESTS)

    def __repr__(self) -> str:
        return f"KubernetesStore(namespace={self._namespace!r}, group={self._group!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._api is not None:
            return
        configuration = await self._load_configuration()
        # Every type's watch holds a connection for as long as it lasts.
        configuration.connection_pool_maxsize = 4 * len(self._plurals) + 64
        api = k8s.ApiClient(configuration)
        self._api = api
        self._custom = k8s.CustomObjectsApi(api)
        self._core = k8s.CoreV1Api(api)
        try:
            await self._prepare_cluster()
            start, head = await self._start_revision()
            self._tail = _Merger(self, start, keep=self._window, head=head)
            self._tail.run()
        except BaseException:
            await self.aclose()
            raise

    async def _load_configuration(self) -> k8s.Configuration:
        configuration = k8s.Configuration()
        try:
            if self._kubeconfig is None:
                try:
                    k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                        client_configuration=configuration
                    )
                    return configuration
                except ConfigException:
                    pass  # not in a pod: the user's kubeconfig, as kubectl does
            await k8s_config.load_kube_config(
                config_file=self._kubeconfig,
                context=self._context,
                client_configuration=configuration,
                persist_config=False,
            )
        except (ConfigException, OSError, ValueError, TypeError) as exc:
            where = self._kubeconfig or "~/.kube/config (or the pod's service account)"
            raise ConfigError(f"cannot load the Kubernetes configuration {where}: {exc}") from exc
        return configuration

    async def _prepare_cluster(self) -> None:
        core = self._core_api()
        cluster = await self._call("read namespace kube-system", core.read_namespace("kube-system"))
        try:
            namespace = await self._call(
                f"read namespace {self._namespace}", core.read_namespace(self._namespace)
            )
        except ApiException as exc:
            if _status(exc) != 404:
                raise self._unexpected(exc, f"read namespace {self._namespace}") from exc
            body = k8s.V1Namespace(
                metadata=k8s.V1ObjectMeta(name=self._namespace, labels=dict(_PART_OF_KDS))
            )
            try:
                namespace = await self._call(
                    f"create namespace {self._namespace}", core.create_namespace(body)
                )
            except ApiException as again:
                if _status(again) != 409:
                    raise self._unexpected(again, f"create namespace {self._namespace}") from again
                namespace = await self._call(
                    f"read namespace {self._namespace}", core.read_namespace(self._namespace)
                )
        identity = f"{cluster.metadata.uid}/{namespace.metadata.uid}/{self._group}"
        self._epoch = "k8s-" + hashlib.sha256(identity.encode()).hexdigest()[:24]
        await self._ensure_crds()

    async def _ensure_crds(self) -> None:
        extensions = k8s.ApiextensionsV1Api(self._client())
        listed = await self._call(
            "list CustomResourceDefinitions",
            extensions.list_custom_resource_definition(_preload_content=False),
        )
        existing = {item["metadata"]["name"]: item for item in listed["items"]}
        for type_name, manifest in self._crds.items():
            name = crd_name(type_name, self._group)
            found = existing.get(name)
            if found is None:
                try:
                    await self._call(
                        f"create CRD {name}",
                        # The client serialises a plain dict as it is: the manifest
                        # kds.k8s builds, the same one `kdsctl install` prints.
                        extensions.create_custom_resource_definition(
                            cast("Any", manifest), _preload_content=False
                        ),
                    )
                except ApiException as exc:
                    if _status(exc) != 409:  # another control plane created it first
                        raise self._unexpected(exc, f"create CRD {name}") from exc
                await self._wait_established(extensions, name)
                continue
            served = {v.get("name") for v in found["spec"].get("versions", []) if v.get("served")}
            if found["spec"]["names"].get("kind") != type_name or self._version not in served:
                raise ConfigError(
                    f"CRD {name} exists but does not serve kind {type_name} in version "
                    f"{self._version} (it serves {sorted(served)}): update or delete it"
                )

    async def _wait_established(self, extensions: k8s.ApiextensionsV1Api, name: str) -> None:
        deadline = asyncio.get_running_loop().time() + _ESTABLISH_TIMEOUT
        while True:
            response = await self._call(
                f"read CRD {name}",
                extensions.read_custom_resource_definition(name, _preload_content=False),
            )
            conditions = (response.get("status") or {}).get("conditions") or []
            if any(
                c.get("type") == "Established" and c.get("status") == "True" for c in conditions
            ):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise StoreUnavailableError(f"{self}: CRD {name} was not established in time")
            await asyncio.sleep(0.2)  # polling the API server: there is no cheaper signal

    async def _start_revision(self) -> tuple[int, int]:
        """Where the tail starts, and the head as known there.

        Events before the newest object's revision are all reflected in the view; only
        deletions after it are not. Starting there (or, in a store with no objects,
        where the store was created), the tail sees those, so the head -- the last
        event -- is exact even right after opening.
        """
        meta = await self._read_configmap(_META_CONFIGMAP)
        if meta is None:
            body = self._configmap_body(_META_CONFIGMAP, {"horizon": "0"}, None)
            try:
                meta = await self._call(
                    "create ConfigMap kds-store",
                    self._core_api().create_namespaced_config_map(
                        self._namespace, body, _preload_content=False
                    ),
                )
            except ApiException as exc:
                if _status(exc) != 409:
                    raise self._unexpected(exc, "create ConfigMap kds-store") from exc
                meta = await self._read_configmap(_META_CONFIGMAP)
        assert meta is not None  # noqa: S101 -- created or read just now
        data = meta.get("data") or {}
        floor = _revision(data.get("floor") or meta["metadata"]["resourceVersion"])
        self._floor = floor
        self._horizon = int(data.get("horizon") or 0)
        self._lost = int(data.get("lost") or 0)
        newest = 0
        for items, _ in await asyncio.gather(*map(self._list, self._plurals)):
            for item in items:
                newest = max(newest, _revision(item["metadata"]["resourceVersion"]))
        return max(floor, newest), newest

    def _relist(self, failed: _Merger) -> None:
        """Replace a live tail that met 410 Gone by one starting at the current revision.

        The events it could not read are gone: the horizon moves to where the new tail
        starts, so followers behind it get CompactedError and take a snapshot.
        """
        if self._tail is not failed:
            return

        async def relist() -> None:
            try:
                start = await self._current_revision()
            except (StoreUnavailableError, StoreClosedError) as exc:
                logger.warning("%s: cannot relist after 410 Gone: %s", self, exc)
                return
            if self._tail is not failed:
                return
            logger.warning(
                "%s: the API server compacted revisions this store still needed; "
                "the log now continues after revision %d",
                self,
                start,
            )
            self._lost = max(self._lost, start)
            tail = _Merger(self, start, keep=self._window, head=start)
            self._tail = tail
            tail.run()
            await failed.stop()

        self._background.add(task := asyncio.create_task(relist()))
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        tail, self._tail = self._tail, None
        if tail is not None:
            await tail.stop()
            tail._fail(StoreClosedError(f"{self} was closed"))
        api, self._api = self._api, None
        self._custom = self._core = None
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
            # One turn of the loop: aborted connections finish closing their sockets.
            await asyncio.sleep(0)

    @property
    def epoch(self) -> str:
        if self._epoch is None or self._api is None:
            raise StoreClosedError(f"{self} is not open")
        return self._epoch

    # -- requests --------------------------------------------------------------------

    def _client(self) -> k8s.ApiClient:
        if self._api is None:
            raise StoreClosedError(f"{self} is not open")
        return self._api

    def _custom_api(self) -> k8s.CustomObjectsApi:
        if self._custom is None:
            raise StoreClosedError(f"{self} is not open")
        return self._custom

    def _core_api(self) -> k8s.CoreV1Api:
        if self._core is None:
            raise StoreClosedError(f"{self} is not open")
        return self._core

    def _live_tail(self) -> _Merger:
        if self._tail is None:
            raise StoreClosedError(f"{self} is not open")
        return self._tail

    def _unexpected(self, exc: ApiException, what: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{self}: {what}: HTTP {_status(exc)} from the API server: {_message(exc)}"
        )

    async def _call(self, what: str, request: Any, *, stream: bool = False) -> Any:
        """Await one API request; transport failures and 5xx become StoreUnavailableError.

        A raw (``_preload_content=False``) answer is read as JSON and its connection
        released, unless *stream* asks for the response itself (a watch). 4xx answers
        other than 401/403/429 are the caller's to interpret, as :class:`ApiException`.
        """
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the request completes, and a watch task would never stop.
            async with self._limit, asyncio.timeout(self._request_timeout):
                response = await request
                if isinstance(response, aiohttp.ClientResponse) and response.status >= 400:
                    # With _preload_content=False the client returns every answer
                    # as it is: errors are ours to raise, as the client would.
                    error = ApiException(status=response.status, reason=response.reason)
                    error.body = await response.read()
                    response.release()
                    raise error
                if stream or not isinstance(response, aiohttp.ClientResponse):
                    return response
                async with response:
                    return await response.json()
        except ApiException as exc:
            status = _status(exc)
            if status in (401, 403):
                raise StoreUnavailableError(
                    f"{self}: {what}: the API server refused the credentials (HTTP {status}): "
                    f"{_message(exc)}; check the kubeconfig or the service account's RBAC"
                ) from exc
            if status >= 500 or status == 429 or status == 0:
                raise self._unexpected(exc, what) from exc
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise StoreUnavailableError(
                f"{self}: {what}: cannot reach the API server: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if inspect.iscoroutine(request):
                # Never awaited when cancelled while queued: close it quietly.
                request.close()

    def _path_args(self, type_name: str) -> tuple[str, str, str, str]:
        return (self._group, self._version, self._namespace, self._plurals[type_name])

    async def _list(
        self, type_name: str, *, selector: str | None = None, at: int | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Every object of *type_name* (at revision *at*, or now) and the list's revision."""
        custom = self._custom_api()
        items: list[dict[str, Any]] = []
        token: str | None = None
        revision = 0
        while True:
            kwargs: dict[str, Any] = {"limit": _PAGE_SIZE, "_preload_content": False}
            if selector:
                kwargs["label_selector"] = selector
            if token:
                kwargs["_continue"] = token
            elif at is not None:
                kwargs["resource_version"] = str(at)
                kwargs["resource_version_match"] = "Exact"
            try:
                response = await self._call(
                    f"list {self._plurals[type_name]}",
                    custom.list_namespaced_custom_object(*self._path_args(type_name), **kwargs),
                )
            except ApiException as exc:
                if _status(exc) == 410 and at is not None:
                    raise CompactedError(at, at + 1) from exc
                raise self._unexpected(exc, f"list {self._plurals[type_name]}") from exc
            page = response
            items.extend(page.get("items") or [])
            metadata = page.get("metadata") or {}
            revision = _revision(metadata.get("resourceVersion") or 0)
            token = metadata.get("continue")
            if not token:
                return items, revision

    async def _current_revision(self) -> int:
        """The cluster's revision now: a list request's resourceVersion (a quorum read)."""
        first = next(iter(self._plurals))
        response = await self._call(
            "read the current revision",
            self._custom_api().list_namespaced_custom_object(
                *self._path_args(first), limit=1, _preload_content=False
            ),
        )
        return _revision((response.get("metadata") or {}).get("resourceVersion"))

    async def _watch_stream(
        self, type_name: str, after: int
    ) -> AsyncGenerator[tuple[int, Event | None], None]:
        """One watch of *type_name* from *after*: (revision, event or None) until it ends.

        Raises:
            CompactedError: the API server no longer has revision *after* (410).
            StoreUnavailableError: the watch could not be opened or broke.
        """
        what = f"watch {self._plurals[type_name]}"
        try:
            response = await self._call(
                what,
                self._custom_api().list_namespaced_custom_object(
                    *self._path_args(type_name),
                    watch=True,
                    resource_version=str(after),
                    allow_watch_bookmarks=True,
                    timeout_seconds=int(self._watch_timeout),
                    _preload_content=False,
                    _request_timeout=self._watch_timeout + self._request_timeout,
                ),
                stream=True,
            )
        except ApiException as exc:
            if _status(exc) == 410:
                raise CompactedError(after, after + 1) from exc
            raise self._unexpected(exc, what) from exc
        try:
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield self._watch_event(type_name, after, line)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise StoreUnavailableError(f"{self}: {what} broke: {exc}") from exc
        finally:
            # An unfinished stream cannot go back to the pool. Abort its connection
            # rather than close it: a TLS close waits for the server's goodbye, which
            # would outlive a store that is closing.
            connection = response.connection
            if connection is not None and connection.transport is not None:
                connection.transport.abort()
            response.close()

    def _watch_event(self, type_name: str, after: int, line: bytes) -> tuple[int, Event | None]:
        try:
            message = json.loads(line)
            kind = message["type"]
            obj = message["object"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreUnavailableError(f"{self}: malformed watch event: {line[:200]!r}") from exc
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise CompactedError(after, after + 1)
            raise StoreUnavailableError(
                f"{self}: watch of {self._plurals[type_name]} failed: {obj.get('message')}"
            )
        revision = _revision(obj["metadata"]["resourceVersion"])
        if kind == "BOOKMARK":
            return revision, None
        try:
            resource = from_object(obj, self.catalog)
        except ValidationError as exc:
            name = obj.get("metadata", {}).get("name")
            logger.warning("%s: ignoring %s %s: %s", self, type_name, name, exc)
            return revision, None
        if kind == "DELETED":
            event: Event = Deleted(
                revision=revision,
                key=resource.key,
                version=resource.version,
                labels=resource.labels,
            )
        else:
            event = Upserted(revision=revision, resource=resource)
        return revision, event

    # -- ConfigMaps (store metadata and tracking cursors) ------------------------------

    def _configmap_body(
        self, name: str, data: Mapping[str, str], resource_version: str | None
    ) -> k8s.V1ConfigMap:
        labels = dict(_PART_OF_KDS)
        if name.startswith(_TRACKING_PREFIX):
            labels[_TRACKING_LABEL] = "true"
        metadata = k8s.V1ObjectMeta(
            name=name,
            namespace=self._namespace,
            labels=labels,
            resource_version=resource_version,
        )
        return k8s.V1ConfigMap(
            api_version="v1", kind="ConfigMap", metadata=metadata, data=dict(data)
        )

    async def _read_configmap(self, name: str) -> dict[str, Any] | None:
        try:
            response = await self._call(
                f"read ConfigMap {name}",
                self._core_api().read_namespaced_config_map(
                    name, self._namespace, _preload_content=False
                ),
            )
        except ApiException as exc:
            if _status(exc) == 404:
                return None
            raise self._unexpected(exc, f"read ConfigMap {name}") from exc
        found: dict[str, Any] = response
        return found

    async def _write_configmap(
        self, name: str, data: Mapping[str, str], current: Mapping[str, Any] | None
    ) -> None:
        """Create or replace ConfigMap *name*, conditional on *current*'s resourceVersion.

        Raises:
            ConflictError: someone else wrote it since *current* was read.
        """
        core = self._core_api()
        try:
            if current is None:
                body = self._configmap_body(name, data, None)
                await self._call(
                    f"create ConfigMap {name}",
                    core.create_namespaced_config_map(
                        self._namespace, body, _preload_content=False
                    ),
                )
            else:
                version = current["metadata"]["resourceVersion"]
                body = self._configmap_body(name, data, version)
                await self._call(
                    f"replace ConfigMap {name}",
                    core.replace_namespaced_config_map(
                        name, self._namespace, body, _preload_content=False
                    ),
                )
        except ApiException as exc:
            if _status(exc) in (404, 409):
                raise ConflictError(f"{self}: ConfigMap {name} was changed concurrently") from exc
            raise self._unexpected(exc, f"write ConfigMap {name}") from exc

    @staticmethod
    def _tracking_name(origin: str) -> str:
        return _TRACKING_PREFIX + hashlib.sha256(origin.encode()).hexdigest()[:40]

    async def _tracking_configmap(self, origin: str) -> tuple[Cursor | None, dict[str, Any] | None]:
        found = await self._read_configmap(self._tracking_name(origin))
        if found is None:
            return None, None
        data = found.get("data") or {}
        try:
            return Cursor(data["epoch"], int(data["revision"])), found
        except (KeyError, ValueError) as exc:
            raise StoreUnavailableError(
                f"{self}: tracking ConfigMap of {origin!r} is malformed: {exc}"
            ) from exc

    # -- writes ----------------------------------------------------------------------

    async def _commit_prepared(
        self, changes: Sequence[PreparedChange], tracking: Tracking | None
    ) -> int:
        async with self._commit_lock:
            return await self._commit_locked(changes, tracking)

    async def _commit_locked(
        self, changes: Sequence[PreparedChange], tracking: Tracking | None
    ) -> int:
        tracking_object: dict[str, Any] | None = None
        if tracking is not None:
            stored, tracking_object = await self._tracking_configmap(tracking.origin)
            error = self.tracking_conflict(tracking, stored)
            if error is not None:
                raise error
        objects = await self._objects({prepared.change.key for prepared in changes})
        plan = self._plan(changes, objects)
        revision: int | None = None
        for step in plan:
            revision = await self._write(step, objects)
        if tracking is not None:
            data = {
                "origin": tracking.origin,
                "epoch": tracking.cursor.epoch,
                "revision": str(tracking.cursor.revision),
            }
            try:
                await self._write_configmap(
                    self._tracking_name(tracking.origin), data, tracking_object
                )
            except ConflictError:
                raise ConflictError(
                    f"tracking cursor for {tracking.origin!r} was moved by another writer"
                ) from None
        if revision is None:
            return await self.head()
        # Read-your-writes: followers and head() see this commit once it returns.
        await self._live_tail().wait_until(revision)
        return revision

    def _plan(
        self,
        changes: Sequence[PreparedChange],
        objects: dict[ResourceKey, dict[str, Any] | None],
    ) -> list[tuple[PreparedChange, int, datetime | None]]:
        """Check every change against the stored objects, before anything is written.

        Returns the writes to make, in order: each change that takes effect, with the
        version it writes and the creation time to keep.
        """
        state: dict[ResourceKey, tuple[int, str | None, datetime | None]] = {}
        for key, obj in objects.items():
            if obj is None:
                state[key] = (0, None, None)
            else:
                resource = from_object(obj, self.catalog)
                annotations = obj["metadata"].get("annotations") or {}
                state[key] = (
                    resource.version,
                    annotations.get(ANNOTATION_DIGEST),
                    resource.created_at,
                )
        plan: list[tuple[PreparedChange, int, datetime | None]] = []
        for prepared in changes:
            change = prepared.change
            key = change.key
            version, stored_digest, created = state[key]
            check_expected(key, change.expected_version, version)
            if isinstance(change, Delete):
                if version == 0:
                    if change.missing_ok or change.expected_version == 0:
                        continue
                    raise NotFoundError(key)
                plan.append((prepared, version, None))
                state[key] = (0, None, None)
                continue
            assert prepared.labels_blob is not None  # noqa: S101 -- upserts are encoded
            assert prepared.spec_blob is not None  # noqa: S101 -- upserts are encoded
            new_digest = digest(prepared.labels_blob, prepared.spec_blob)
            if version and stored_digest == new_digest:
                continue  # identical: no effect, no event
            plan.append((prepared, version + 1, created))
            state[key] = (version + 1, new_digest, created or datetime.now(UTC))
        return plan

    async def _write(
        self,
        step: tuple[PreparedChange, int, datetime | None],
        objects: dict[ResourceKey, dict[str, Any] | None],
    ) -> int:
        """Make one planned write, conditional on the object *objects* holds; its revision."""
        prepared, version, created = step
        change = prepared.change
        key = change.key
        type_name = key.type
        custom = self._custom_api()
        current = objects.get(key)
        name = object_name(key)
        what = f"write {type_name} {name}"
        try:
            if isinstance(change, Delete):
                assert current is not None  # noqa: S101 -- planned deletes exist
                options = k8s.V1DeleteOptions(
                    preconditions=k8s.V1Preconditions(
                        resource_version=current["metadata"]["resourceVersion"]
                    )
                )
                response = await self._call(
                    f"delete {type_name} {name}",
                    custom.delete_namespaced_custom_object(
                        *self._path_args(type_name), name, body=options, _preload_content=False
                    ),
                )
                deleted = response
                objects[key] = None
                return _revision(deleted["metadata"]["resourceVersion"])
            assert prepared.labels_blob is not None  # noqa: S101 -- upserts are encoded
            assert prepared.spec_blob is not None  # noqa: S101 -- upserts are encoded
            now = datetime.now(UTC)
            resource = Resource(
                key=key,
                labels=unpack_mapping(prepared.labels_blob),
                spec=unpack_mapping(prepared.spec_blob),
                version=version,
                created_at=created or now,
                modified_at=now,
            )
            body = to_object(
                resource,
                self.catalog.validate_key(key),
                content_digest=digest(prepared.labels_blob, prepared.spec_blob),
                group=self._group,
                version=self._version,
                namespace=self._namespace,
            )
            if current is None:
                response = await self._call(
                    what,
                    custom.create_namespaced_custom_object(
                        self._group,
                        self._version,
                        self._namespace,
                        self._plurals[type_name],
                        body,
                        _preload_content=False,
                    ),
                )
            else:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                response = await self._call(
                    what,
                    custom.replace_namespaced_custom_object(
                        *self._path_args(type_name), name, body, _preload_content=False
                    ),
                )
            written: dict[str, Any] = response
            objects[key] = written
            return _revision(written["metadata"]["resourceVersion"])
        except ApiException as exc:
            status = _status(exc)
            if status in (404, 409):
                raise ConflictError(
                    f"{key} was changed concurrently ({_message(exc)})", key=key
                ) from exc
            if status in (413, 422):
                raise ValidationError(
                    "resource", f"{key} was refused by the API server: {_message(exc)}"
                ) from exc
            raise self._unexpected(exc, what) from exc

    async def compact(self, through: int) -> None:
        if through < 0:
            raise ValueError(f"through must be >= 0, got {through}")
        head = await self.head()
        if through > head:
            raise ValueError(f"cannot compact through {through}: the head is {head}")
        while True:
            meta = await self._read_configmap(_META_CONFIGMAP)
            data = dict((meta or {}).get("data") or {})
            stored = int(data.get("horizon") or 0)
            if through <= stored:
                self._horizon = max(self._horizon, stored)
                return
            data["horizon"] = str(through)
            if meta is not None:
                # Until its first change the ConfigMap's own resourceVersion is the
                # store's creation, the floor every opener starts its history from:
                # keep it before this write moves the resourceVersion.
                data.setdefault("floor", meta["metadata"]["resourceVersion"])
            try:
                await self._write_configmap(_META_CONFIGMAP, data, meta)
            except ConflictError:
                continue  # another compaction or a first open: read it again
            self._horizon = through
            return

    # -- reads -----------------------------------------------------------------------

    async def _fresh(self) -> _Merger:
        """The tail, once it has every event committed before this call."""
        revision = await self._current_revision()
        while True:
            tail = self._live_tail()
            try:
                await tail.wait_until(revision)
            except CompactedError:
                if self._tail is tail or self._tail is None:
                    raise
                continue  # relisted: the new tail starts at or after *revision*
            return tail

    async def head(self) -> int:
        return (await self._fresh()).last_event

    async def horizon(self) -> int:
        meta = await self._read_configmap(_META_CONFIGMAP)
        stored = int(((meta or {}).get("data") or {}).get("horizon") or 0)
        self._horizon = max(self._horizon, stored, self._lost)
        return self._horizon

    async def _fetch_one(self, key: ResourceKey) -> dict[str, Any] | None:
        name = object_name(key)
        try:
            response = await self._call(
                f"read {key.type} {name}",
                self._custom_api().get_namespaced_custom_object(
                    *self._path_args(key.type), name, _preload_content=False
                ),
            )
        except ApiException as exc:
            if _status(exc) == 404:
                return None
            raise self._unexpected(exc, f"read {key.type} {name}") from exc
        found: dict[str, Any] = response
        return found

    async def _objects(
        self, keys: Collection[ResourceKey]
    ) -> dict[ResourceKey, dict[str, Any] | None]:
        """The stored object at each key (``None`` where there is none)."""
        by_type: dict[str, list[ResourceKey]] = {}
        for key in keys:
            self.catalog.validate_key(key)
            by_type.setdefault(key.type, []).append(key)
        found: dict[ResourceKey, dict[str, Any] | None] = {}
        for type_name, wanted in by_type.items():
            if len(wanted) > _GET_ONE_BY_ONE:
                items, _ = await self._list(type_name)
                by_name = {item["metadata"]["name"]: item for item in items}
                for key in wanted:
                    found[key] = by_name.get(object_name(key))
            else:
                fetched = await asyncio.gather(*(self._fetch_one(key) for key in wanted))
                found.update(zip(wanted, fetched, strict=True))
        for key, obj in found.items():
            if obj is not None and self._key_of(obj) != key:
                raise ValidationError(
                    "key",
                    f"{key} maps to Kubernetes object {object_name(key)}, which holds "
                    f"{self._key_of(obj)}: rename one of them",
                )
        return found

    def _key_of(self, obj: Mapping[str, Any]) -> ResourceKey | None:
        try:
            return from_object(obj, self.catalog).key
        except ValidationError:
            return None

    def _resource(self, obj: Mapping[str, Any]) -> Resource | None:
        try:
            return from_object(obj, self.catalog)
        except ValidationError as exc:
            logger.warning("%s: ignoring %s: %s", self, obj.get("metadata", {}).get("name"), exc)
            return None

    async def get(self, key: ResourceKey) -> Resource:
        obj = (await self._objects([key]))[key]
        resource = None if obj is None else self._resource(obj)
        if resource is None:
            raise NotFoundError(key)
        return resource

    async def find_many(self, keys: Collection[ResourceKey]) -> dict[ResourceKey, Resource]:
        found: dict[ResourceKey, Resource] = {}
        for key, obj in (await self._objects(keys)).items():
            resource = None if obj is None else self._resource(obj)
            if resource is not None:
                found[key] = resource
        return found

    async def find_versions(
        self, keys: Collection[ResourceKey]
    ) -> dict[ResourceKey, StoredVersion]:
        found = await self.find_many(keys)
        return {key: StoredVersion(r.version, r.labels) for key, r in found.items()}

    async def list_resources(
        self,
        type_name: str | None = None,
        *,
        mesh: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Resource]:
        self._client()
        if type_name is not None and type_name not in self._plurals:
            return []
        types = [type_name] if type_name is not None else list(self._plurals)
        # Labels Kubernetes can hold are selected by the API server; the rest here.
        selector = ",".join(
            f"{name}={value}" for name, value in (labels or {}).items() if is_label(name, value)
        )
        listed = await asyncio.gather(
            *(self._list(name, selector=selector or None) for name in types)
        )
        resources: list[Resource] = []
        for items, _ in listed:
            for item in items:
                resource = self._resource(item)
                if resource is not None and matches(resource, None, mesh, labels):
                    resources.append(resource)
        resources.sort(key=lambda resource: resource.key)
        return resources

    async def snapshot(self, types: Collection[str] | None = None) -> Snapshot:
        tail = await self._fresh()
        head = tail.last_event
        # Every type listed at one revision: the watermark, past the head with no
        # event in between, so this is the view right after the head.
        at = tail.watermark
        wanted = [t for t in self._plurals if types is None or t in types]
        listed = await asyncio.gather(*(self._list(type_name, at=at) for type_name in wanted))
        resources: list[Resource] = []
        for items, _ in listed:
            resources.extend(r for r in map(self._resource, items) if r is not None)
        resources.sort(key=lambda resource: resource.key)
        return Snapshot(cursor=Cursor(self.epoch, head), resources=resources)

    async def read(self, after: int, *, limit: int = DEFAULT_READ_LIMIT) -> list[Event]:
        check_read_args(after, limit)
        horizon = await self.horizon()
        if after < horizon:
            raise CompactedError(after, horizon)
        tail = await self._fresh()
        return await self._events_after(tail, after, limit)

    async def _events_after(self, tail: _Merger, after: int, limit: int) -> list[Event]:
        if after >= tail.released_after:
            return tail.after(after, limit)
        return await self._catch_up(tail, after, limit)

    async def _catch_up(self, tail: _Merger, after: int, limit: int) -> list[Event]:
        """Events after *after* from fresh watches, for a reader older than the tail."""
        # Nothing of this store is older than its creation (and a watch from "0" would
        # mean "from now" to the API server).
        merger = _Merger(self, max(after, self._floor), keep=None)
        merger.run()
        try:
            target = tail.released_after
            while True:
                if len(merger.released) >= limit:
                    return list(itertools.islice(merger.released, limit))
                if merger.watermark >= target:
                    events = list(merger.released)
                    if len(events) < limit:
                        last = events[-1].revision if events else after
                        events.extend(tail.after(max(last, target), limit - len(events)))
                    return events
                if merger.failure is not None:
                    if isinstance(merger.failure, CompactedError):
                        raise CompactedError(after, max(await self.horizon(), after + 1))
                    raise merger.failure
                await merger.changed.wait()
        finally:
            await merger.stop()

    async def tracking(self, origin: str) -> Cursor | None:
        self._client()
        cursor, _ = await self._tracking_configmap(origin)
        return cursor

    async def wait_for_commit(self, after: int) -> None:
        tail = self._live_tail()
        while tail.last_event <= after:
            if tail.failure is not None:
                raise tail.failure
            await tail.changed.wait()

    async def follow(
        self, after: int | Cursor, *, batch_size: int = DEFAULT_READ_LIMIT
    ) -> AsyncGenerator[Event, None]:
        # As Store.follow, without read()'s freshness round trip per page: a follower
        # wakes on the tail's own progress.
        if isinstance(after, Cursor):
            await self.check_cursor(after)
            position = after.revision
        else:
            check_read_args(after, batch_size)
            horizon = await self.horizon()
            if after < horizon:
                raise CompactedError(after, horizon)
            position = after
        while True:
            if position < self._horizon:
                raise CompactedError(position, self._horizon)
            tail = self._live_tail()
            if tail.failure is not None:
                raise tail.failure
            events = await self._events_after(tail, position, batch_size)
            for event in events:
                yield event
                position = event.revision
            if len(events) < batch_size:
                await self.wait_for_commit(position)
