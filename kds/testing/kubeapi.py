"""A Kubernetes API server stand-in for tests, in memory, over HTTPS.

No kube-apiserver can run where kds's tests run, yet the Kubernetes store talks to
one through the real ``kubernetes_asyncio`` client. This module serves the part of
the Kubernetes API that store uses, following the API conventions closely enough
that the client library works against it unchanged:

* discovery (``/version``, ``/api``, ``/apis`` and the group documents);
* namespaces (``kube-system`` and ``default`` exist from the start, each with a
  uid of its own per server; deleting a namespace deletes what is in it first,
  and ``default`` and ``kube-system`` may not be deleted);
* ConfigMaps, CustomResourceDefinitions (validated, ``Established`` at once) and
  the custom objects of every registered definition, namespaced or cluster-scoped,
  in every served version, with the ``status`` subresource when declared;
* create, get, replace (``resourceVersion`` preconditions, no-op updates that
  change nothing, ``generation``), delete (``DeleteOptions`` preconditions; a
  custom object, definition or namespace comes back at the deletion's revision, a
  ConfigMap as a ``Success`` Status, as the API server answers), delete
  collection, list (label and field selectors, ``limit``/``continue`` on a
  consistent snapshot, ``resourceVersion``/``resourceVersionMatch`` including
  ``Exact`` reads of past state) and watch (from a revision, or the current state
  first; ``sendInitialEvents``; bookmarks; ``timeoutSeconds``);
* one global revision counter, like etcd's, starting at a random value per server.
  History is kept until compacted (``/_standin/compact``); the revisions before
  the first write count as compacted. Lists at ``Exact`` revisions and watches
  from revisions below the compaction revision get ``410 Expired``; at or above
  it they are served from the history;
* Kubernetes ``Status`` errors (NotFound, AlreadyExists, Conflict, Invalid,
  Expired, BadRequest, Unauthorized, Forbidden, MethodNotAllowed,
  RequestEntityTooLarge, Timeout for revisions ahead of the server's);
* bearer-token authentication (every path, ``/version`` included);
* test controls under ``/_standin/``: compact history, end every watch, read the
  revision counters.

It does **not** model admission (webhooks, defaulting), OpenAPI schema validation
or pruning of custom objects, RBAC, finalizers and graceful deletion (objects go
at once), garbage collection by owner references, PATCH and server-side apply
(405), ``dryRun``, version conversion beyond rewriting ``apiVersion``, the watch
cache's window and etcd's timing (a write's event is queued for the watches in
the same step as the write), automatic compaction, or etcd's object size limit. Bookmarks
come a few milliseconds after the revision moves while a watch is idle, far more
often than a real server's (about once a minute), which clients must accept
anyway.

:class:`KubeApiServer` runs it as a child process on a free 127.0.0.1 port, with a
self-signed certificate and a random bearer token by default, and writes a
kubeconfig for clients. ``python -m kds.testing.kubeapi --help`` runs it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import enum
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import yaml
from aiohttp import web

from kds.testing._server import ServerProcess, free_port, server_directory
from kds.tls import generate_certificate

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

__all__ = [
    "GENERATED",
    "GIT_VERSION",
    "MAX_BODY",
    "ApiError",
    "KubeApi",
    "KubeApiServer",
    "create_app",
    "main",
]

logger = logging.getLogger(__name__)

Json = dict[str, Any]
Key = tuple[str, str]  # (namespace, or "" for cluster-scoped objects; name)

GIT_VERSION: Final = "v1.31.0-kds-standin"
"""What ``GET /version`` answers as ``gitVersion``."""

MAX_BODY: Final = 3 * 1024 * 1024  # bytes: the API server's request body limit
MAX_ANNOTATIONS: Final = 256 * 1024  # bytes: keys and values of one object's annotations
_START_TIMEOUT: Final = 30.0  # seconds for the server to answer /version
_STOP_TIMEOUT: Final = 10.0  # seconds for it to exit once told to, before SIGKILL
_HELPER_TIMEOUT: Final = 10.0  # seconds for a test-control request

_ADDED: Final = "ADDED"
_MODIFIED: Final = "MODIFIED"
_DELETED: Final = "DELETED"
_INITIAL: Final = "INITIAL"  # queued only: an ADDED event of a watch's initial state
_SYNCED: Final = "SYNCED"  # queued only: the initial state has been sent

_CRD_GROUP: Final = "apiextensions.k8s.io"
_INITIAL_EVENTS_END: Final = "k8s.io/initial-events-end"
_PROTECTED_NAMESPACES: Final = frozenset({"default", "kube-system"})

# -- names, labels, selectors --------------------------------------------------------------

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE: Final = re.compile(_DNS_LABEL)
_DNS_SUBDOMAIN_RE: Final = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_QUALIFIED_NAME_RE: Final = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_CONFIGMAP_KEY_RE: Final = re.compile(r"[-._a-zA-Z0-9]+")
_SUBDOMAIN_MESSAGE: Final = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. "
    "'example.com', regex used for validation is "
    r"'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MESSAGE: Final = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
    "'-', and must start and end with an alphanumeric character (e.g. 'my-name',  or "
    "'123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_QUALIFIED_MESSAGE: Final = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
    "and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
    "'123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_VALUE_MESSAGE: Final = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', "
    "'_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue', "
    " or 'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


def _dns_subdomain_error(name: str) -> str | None:
    if len(name) > 253:
        return "must be no more than 253 characters"
    if not _DNS_SUBDOMAIN_RE.fullmatch(name):
        return _SUBDOMAIN_MESSAGE
    return None


def _dns_label_error(name: str) -> str | None:
    if len(name) > 63:
        return "must be no more than 63 characters"
    if not _DNS_LABEL_RE.fullmatch(name):
        return _LABEL_MESSAGE
    return None


def _qualified_name_error(key: str) -> str | None:
    """Why *key* is no valid label or annotation key (``[prefix/]name``), if it is not."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return "prefix part must be non-empty"
        error = _dns_subdomain_error(prefix)
        if error is not None:
            return f"prefix part {error}"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME_RE.fullmatch(name):
        return _QUALIFIED_MESSAGE
    return None


def _label_value_error(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if value and not _QUALIFIED_NAME_RE.fullmatch(value):
        return _VALUE_MESSAGE
    return None


_SELECTOR_TOKEN_RE: Final = re.compile(r"\s*(!=|==|=|!|\(|\)|,|>|<|[^\s,=!()<>]+)")
_SELECTOR_OPERATORS: Final = frozenset({"!=", "==", "=", "!", "(", ")", ",", ">", "<"})


@dataclass(frozen=True, slots=True)
class _Requirement:
    key: str
    operator: str  # "in", "notin", "exists", "!", "gt", "lt"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "exists":
            return value is not None
        if self.operator == "!":
            return value is None
        if self.operator == "in":
            return value is not None and value in self.values
        if self.operator == "notin":
            return value is None or value not in self.values
        if value is None:
            return False
        try:
            number = int(value)
        except ValueError:
            return False
        (bound,) = self.values
        return number > int(bound) if self.operator == "gt" else number < int(bound)


class LabelSelector:
    """A parsed label selector, in Kubernetes' syntax.

    Comma-separated requirements, all of which must hold: ``key=value``,
    ``key==value``, ``key!=value`` (also true without the label), ``key in (a,b)``,
    ``key notin (a,b)`` (also true without the label), ``key`` (present), ``!key``
    (absent), ``key>N`` and ``key<N`` (integer values).

    Args:
        text: the selector; empty selects everything.

    Raises:
        ApiError: 400 BadRequest naming what is wrong with it.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.requirements: tuple[_Requirement, ...] = tuple(self._parse(text))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether an object with *labels* is selected."""
        return all(requirement.matches(labels) for requirement in self.requirements)

    @property
    def empty(self) -> bool:
        """Whether it selects everything."""
        return not self.requirements

    @classmethod
    def _tokens(cls, text: str) -> list[str]:
        tokens: list[str] = []
        position = 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = _SELECTOR_TOKEN_RE.match(text, position)
            if match is None:  # pragma: no cover -- the pattern matches any non-space
                raise _bad_selector(text, f"unexpected character at {position}")
            tokens.append(match.group(1))
            position = match.end()
        return tokens

    @classmethod
    def _parse(cls, text: str) -> list[_Requirement]:
        tokens = cls._tokens(text)
        requirements: list[_Requirement] = []
        index = 0

        def take() -> str | None:
            nonlocal index
            if index >= len(tokens):
                return None
            index += 1
            return tokens[index - 1]

        def peek() -> str | None:
            return tokens[index] if index < len(tokens) else None

        def identifier(what: str) -> str:
            token = take()
            if token is None or token in _SELECTOR_OPERATORS:
                raise _bad_selector(text, f"found {token or 'end of string'!r}, expected: {what}")
            return token

        def key_checked(key: str) -> str:
            error = _qualified_name_error(key)
            if error is not None:
                raise _bad_selector(text, f"key: Invalid value: {key!r}: {error}")
            return key

        def value_checked(value: str) -> str:
            error = _label_value_error(value)
            if error is not None:
                raise _bad_selector(text, f"values[0]: Invalid value: {value!r}: {error}")
            return value

        while index < len(tokens):
            if peek() == "!":
                take()
                requirements.append(_Requirement(key_checked(identifier("identifier")), "!"))
            else:
                key = key_checked(identifier("identifier"))
                operator = peek()
                if operator is None or operator == ",":
                    requirements.append(_Requirement(key, "exists"))
                elif operator in ("=", "==", "!="):
                    take()
                    following = peek()
                    value = "" if following is None or following == "," else identifier("value")
                    requirements.append(
                        _Requirement(
                            key,
                            "notin" if operator == "!=" else "in",
                            frozenset({value_checked(value)}),
                        )
                    )
                elif operator in (">", "<"):
                    take()
                    bound = identifier("an integer")
                    try:
                        int(bound)
                    except ValueError:
                        raise _bad_selector(
                            text,
                            f"for 'Gt', 'Lt' operators, the value must be an integer: {bound!r}",
                        ) from None
                    requirements.append(
                        _Requirement(key, "gt" if operator == ">" else "lt", frozenset({bound}))
                    )
                elif operator in ("in", "notin"):
                    take()
                    if take() != "(":
                        raise _bad_selector(text, f"expected '(' after {operator!r}")
                    values: set[str] = set()
                    while True:
                        item = take()
                        if item == ")" and not values:
                            break
                        if item is None or item in _SELECTOR_OPERATORS:
                            raise _bad_selector(
                                text, f"found {item or 'end of string'!r}, expected: value"
                            )
                        values.add(value_checked(item))
                        separator = take()
                        if separator == ")":
                            break
                        if separator != ",":
                            raise _bad_selector(
                                text,
                                f"found {separator or 'end of string'!r}, expected: ',' or ')'",
                            )
                    if not values:
                        raise _bad_selector(
                            text, "for 'in', 'notin' operators, values set can't be empty"
                        )
                    requirements.append(_Requirement(key, operator, frozenset(values)))
                else:
                    raise _bad_selector(
                        text,
                        f"found {operator!r}, expected: in, notin, =, ==, !=, gt, lt",
                    )
            separator = take()
            if separator is None:
                break
            if separator != "," or peek() is None:
                raise _bad_selector(text, f"found {separator!r}, expected: ','")
        return requirements


def _bad_selector(text: str, problem: str) -> ApiError:
    return ApiError.bad_request(f"unable to parse requirement: {problem} (in {text!r})")


class FieldSelector:
    """A parsed field selector over ``metadata.name`` and ``metadata.namespace``.

    Comma-separated ``field=value``, ``field==value`` or ``field!=value`` terms.

    Args:
        text: the selector; empty selects everything.

    Raises:
        ApiError: 400 BadRequest for another field or a malformed term.
    """

    _FIELDS: Final = ("metadata.name", "metadata.namespace")

    def __init__(self, text: str) -> None:
        self.text = text
        self.terms: list[tuple[str, bool, str]] = []  # (field, equal, value)
        for term in filter(None, (part.strip() for part in text.split(","))):
            match = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(.*)", term)
            if match is None:
                raise ApiError.bad_request(f"invalid selector: {term!r}; expected field=value")
            name, operator, value = match.groups()
            if name not in self._FIELDS:
                raise ApiError.bad_request(f'field label not supported: "{name}"')
            self.terms.append((name, operator != "!=", value.strip()))

    def matches(self, namespace: str, name: str) -> bool:
        """Whether the object *name* in *namespace* is selected."""
        for field_name, equal, value in self.terms:
            actual = name if field_name == "metadata.name" else namespace
            if (actual == value) != equal:
                return False
        return True

    @property
    def empty(self) -> bool:
        """Whether it selects everything."""
        return not self.terms


# -- errors --------------------------------------------------------------------------------


class ApiError(Exception):
    """Raised when a request fails; answered as a Kubernetes ``Status`` object.

    Args:
        code: the HTTP status code.
        reason: the Status ``reason`` (``NotFound``, ``Conflict``...).
        message: what went wrong, in Kubernetes' words where it has some.
        details: the Status ``details`` (name, group, kind, causes).
    """

    def __init__(self, code: int, reason: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Json:
        """The ``Status`` object that reports this error."""
        body: Json = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        """400 BadRequest."""
        return cls(400, "BadRequest", message)

    @classmethod
    def not_found_path(cls) -> ApiError:
        """404 for a path that names nothing the server serves."""
        return cls(404, "NotFound", "the server could not find the requested resource", {})

    @classmethod
    def expired(cls, revision: int, compacted: int) -> ApiError:
        """410 Expired: *revision* is below the compaction revision."""
        return cls(410, "Expired", f"too old resource version: {revision} ({compacted})")


# -- resources and their history ----------------------------------------------------------


@dataclass(slots=True, eq=False)
class Change:
    """One write to a collection: the object after it, and the one before.

    A deleted object's ``obj`` is its last state carrying the deletion's revision.
    """

    revision: int
    type: str  # ADDED, MODIFIED or DELETED
    key: Key
    obj: Json
    prev: Json | None


@dataclass(eq=False)
class Resource:
    """A collection of objects of one type, with its change log.

    The log holds every change after the server's compaction revision, in
    revision order: it is what watches catch up from and what past states are
    rebuilt from (the current objects, with later changes undone).
    """

    group: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    versions: tuple[str, ...]  # served
    builtin: bool = False
    status_versions: frozenset[str] = frozenset()  # versions with a status subresource
    registered: bool = True
    objects: dict[Key, Json] = field(default_factory=dict)
    log: list[Change] = field(default_factory=list)

    @property
    def qualified(self) -> str:
        """``<plural>.<group>``, or the plural alone for the core group."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """``<Kind>.<group>``, or the kind alone for the core group."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def api_version(self, version: str) -> str:
        """The ``apiVersion`` of this type's objects in *version*."""
        return f"{self.group}/{version}" if self.group else version

    def resource_details(self, name: str) -> Json:
        """Status details naming object *name* by resource, as NotFound and Conflict do."""
        details: Json = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.plural
        return details

    def not_found(self, name: str) -> ApiError:
        """404 NotFound for object *name*."""
        return ApiError(
            404, "NotFound", f'{self.qualified} "{name}" not found', self.resource_details(name)
        )

    def conflict(self, name: str, problem: str) -> ApiError:
        """409 Conflict on object *name*."""
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {self.qualified} "{name}": {problem}',
            self.resource_details(name),
        )

    def invalid(self, name: str, causes: list[tuple[str, str]]) -> ApiError:
        """422 Invalid for object *name*; *causes* are ``(field, message)``."""
        messages = [f"{field_name}: {message}" for field_name, message in causes]
        summary = messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"
        details: Json = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.kind
        details["causes"] = [
            {"reason": "FieldValueInvalid", "message": message, "field": field_name}
            for field_name, message in causes
        ]
        return ApiError(
            422, "Invalid", f'{self.qualified_kind} "{name}" is invalid: {summary}', details
        )

    def changes_after(self, revision: int) -> list[Change]:
        """The logged changes with a revision above *revision*, in order."""
        index = bisect.bisect_right(self.log, revision, key=lambda change: change.revision)
        return self.log[index:]


def _invalid_value(value: object, message: str) -> str:
    return f"Invalid value: {json.dumps(value)}: {message}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _metadata(obj: Json) -> Json:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _labels(obj: Json) -> Mapping[str, str]:
    labels = _metadata(obj).get("labels")
    return labels if isinstance(labels, dict) else {}


# -- watches -------------------------------------------------------------------------------


class Watch:
    """One open watch stream: what it selects and the events it has yet to send.

    Writes queue matching events synchronously, in revision order, in the same
    step that takes the revision; so once the queue is empty, every event of the
    watch up to the server's current revision has been sent and a bookmark at
    that revision is true.
    """

    def __init__(
        self,
        resource: Resource,
        *,
        version: str,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        bookmarks: bool,
        sent: int,
    ) -> None:
        self.resource = resource
        self.api_version = resource.api_version(version)
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.bookmarks = bookmarks
        self.sent = sent  # every event with a revision up to this one has been sent
        self.queue: collections.deque[tuple[int, str, Json | None]] = collections.deque()
        self.wake = asyncio.Event()
        self.closed = False  # end now, dropping what is queued
        self.ending = False  # end once the queue is sent

    def selects(self, obj: Json, key: Key) -> bool:
        """Whether the object at *key* with content *obj* belongs to this watch."""
        if self.namespace is not None and key[0] != self.namespace:
            return False
        if not self.fields.empty and not self.fields.matches(key[0], key[1]):
            return False
        return self.labels.empty or self.labels.matches(_labels(obj))

    def offer(self, change: Change) -> None:
        """Queue what *change* means to this watch, if anything.

        An update that moves an object into the selection is ADDED, one that moves
        it out is DELETED (with its previous content at the update's revision), as
        the API server's watch cache reports them.
        """
        now = change.type != _DELETED and self.selects(change.obj, change.key)
        before = change.prev is not None and self.selects(change.prev, change.key)
        if change.type == _DELETED:
            if before:
                self.push(change.revision, _DELETED, change.obj)
            return
        if now:
            self.push(change.revision, _MODIFIED if before else _ADDED, change.obj)
        elif before and change.prev is not None:
            gone = {**change.prev, "metadata": {**_metadata(change.prev)}}
            gone["metadata"]["resourceVersion"] = str(change.revision)
            self.push(change.revision, _DELETED, gone)

    def push(self, revision: int, kind: str, obj: Json | None) -> None:
        """Queue one event and wake the sender."""
        self.queue.append((revision, kind, obj))
        self.wake.set()

    def idle(self) -> bool:
        """Whether it has nothing to send and is to go on."""
        return not self.queue and not self.closed and not self.ending

    def poke(self) -> None:
        """The revision moved: a watch with bookmarks may have one to send."""
        if self.bookmarks:
            self.wake.set()

    def close(self) -> None:
        """End the stream at once."""
        self.closed = True
        self.wake.set()

    def end(self) -> None:
        """End the stream once what is queued is sent."""
        self.ending = True
        self.wake.set()

    def event_line(self, kind: str, obj: Json) -> bytes:
        """One event as a JSON line, the object in this watch's API version."""
        if obj.get("apiVersion") != self.api_version:
            obj = {**obj, "apiVersion": self.api_version}
        return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"

    def bookmark_line(self, revision: int, *, initial_events_end: bool = False) -> bytes:
        """A BOOKMARK event at *revision*."""
        metadata: Json = {"resourceVersion": str(revision)}
        if initial_events_end:
            metadata["annotations"] = {_INITIAL_EVENTS_END: "true"}
        obj = {"kind": self.resource.kind, "apiVersion": self.api_version, "metadata": metadata}
        return (
            json.dumps({"type": "BOOKMARK", "object": obj}, separators=(",", ":")).encode() + b"\n"
        )


# -- the API -------------------------------------------------------------------------------


_TRUE: Final = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "false", "FALSE", "False"})
_WRITE_BATCH: Final = 64 * 1024  # bytes of queued events written at once
_BOOKMARK_DELAY: Final = 0.005  # seconds an idle watch waits for more writes before a bookmark


def _bool_param(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name)
    if value is None or value == "":
        return False
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError.bad_request(f"invalid boolean {name}: {value!r}")


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ApiError.bad_request(f"invalid {name}: {value!r} is not an integer") from None
    if number < 0:
        raise ApiError.bad_request(f"invalid {name}: {value!r} must not be negative")
    return number


def _revision_param(value: str) -> int:
    try:
        revision = int(value)
    except ValueError:
        raise ApiError.bad_request(f"invalid resource version: {value!r}") from None
    if revision < 0:
        raise ApiError.bad_request(f"invalid resource version: {value!r}")
    return revision


def _encode_continue(revision: int, key: Key) -> str:
    token = {"v": "meta.k8s.io/v1", "rv": revision, "start": list(key)}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode()


def _decode_continue(text: str) -> tuple[int, Key]:
    try:
        token = json.loads(base64.urlsafe_b64decode(text.encode()))
        revision, (namespace, name) = token["rv"], token["start"]
        if not (isinstance(revision, int) and isinstance(namespace, str) and isinstance(name, str)):
            raise TypeError(token)
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise ApiError.bad_request(f"continue key is not valid: {text!r}") from None
    return revision, (namespace, name)


class KubeApi:
    """The in-memory API: its collections, revision counter and open watches.

    Args:
        token: the bearer token every request must present; ``None`` accepts all.
        initial_revision: the revision before the first write; random in
            [1000, 100000] by default, so clients assume neither small nor dense
            numbers. History before it counts as compacted.
    """

    def __init__(self, *, token: str | None = None, initial_revision: int | None = None) -> None:
        if initial_revision is not None and initial_revision < 0:
            raise ValueError(f"initial_revision must not be negative, got {initial_revision}")
        self.token = token
        self.revision = (
            1000 + secrets.randbelow(99_001) if initial_revision is None else initial_revision
        )
        self.compacted = self.revision
        self.resources: dict[tuple[str, str], Resource] = {}
        self.watches: set[Watch] = set()
        self.namespaces = self._add(
            Resource("", "namespaces", "Namespace", "namespace", False, ("v1",), builtin=True)
        )
        self.configmaps = self._add(
            Resource("", "configmaps", "ConfigMap", "configmap", True, ("v1",), builtin=True)
        )
        self.crds = self._add(
            Resource(
                _CRD_GROUP,
                "customresourcedefinitions",
                "CustomResourceDefinition",
                "customresourcedefinition",
                False,
                ("v1",),
                builtin=True,
            )
        )
        for name in ("kube-system", "default"):
            self.create(self.namespaces, "v1", None, {"metadata": {"name": name}})

    def _add(self, resource: Resource) -> Resource:
        self.resources[resource.group, resource.plural] = resource
        return resource

    def resource(self, group: str, version: str, plural: str) -> Resource:
        """The registered collection at ``/apis/<group>/<version>/<plural>``.

        Raises:
            ApiError: 404 when no such type is registered or the version is not served.
        """
        resource = self.resources.get((group, plural))
        if resource is None or not resource.registered or version not in resource.versions:
            raise ApiError.not_found_path()
        return resource

    # -- writes ---------------------------------------------------------------------------

    def _commit(
        self, resource: Resource, kind: str, key: Key, obj: Json, prev: Json | None
    ) -> Json:
        """Take the next revision for a write of *obj* (a fresh dict) and tell the watches.

        Everything happens in one synchronous step: no watch can observe the new
        revision before its event is queued.
        """
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        if kind == _DELETED:
            del resource.objects[key]
        else:
            resource.objects[key] = obj
        change = Change(self.revision, kind, key, obj, prev)
        resource.log.append(change)
        for watch in self.watches:
            if watch.resource is resource:
                watch.offer(change)
            else:
                watch.poke()
        return obj

    def _check_type(self, resource: Resource, version: str, body: Json, name: str) -> None:
        causes: list[tuple[str, str]] = []
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if resource.builtin:
            # Typed clients may leave them out; the server knows the type from the URL.
            expected = resource.api_version(version)
            if api_version not in (None, "", expected):
                causes.append(("apiVersion", _invalid_value(api_version, f"must be {expected}")))
            if kind not in (None, "", resource.kind):
                causes.append(("kind", _invalid_value(kind, f"must be {resource.kind}")))
        else:
            if api_version != resource.api_version(version):
                causes.append(
                    (
                        "apiVersion",
                        _invalid_value(
                            api_version, f"must be {resource.api_version(version)} (from the URL)"
                        ),
                    )
                )
            if kind != resource.kind:
                causes.append(("kind", _invalid_value(kind, f"must be {resource.kind}")))
        if causes:
            raise resource.invalid(name, causes)

    @staticmethod
    def _metadata_of(body: Json) -> Json:
        meta = body.get("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError.bad_request("metadata must be a JSON object")
        for name in ("labels", "annotations"):
            value = meta.get(name)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(
                isinstance(item, str) for item in value.values()
            ):
                raise ApiError.bad_request(
                    f"metadata.{name} must be a JSON object of string values"
                )
        return meta

    def _validate(self, resource: Resource, name: str, obj: Json) -> None:
        """Raise 422 Invalid if *obj* breaks the rules of metadata or of its type."""
        meta = obj["metadata"]
        causes: list[tuple[str, str]] = []
        name_error = (
            _dns_label_error(name) if resource is self.namespaces else _dns_subdomain_error(name)
        )
        if name_error is not None:
            causes.append(("metadata.name", _invalid_value(name, name_error)))
        for key, value in (meta.get("labels") or {}).items():
            key_error = _qualified_name_error(key)
            if key_error is not None:
                causes.append(("metadata.labels", _invalid_value(key, key_error)))
            value_error = _label_value_error(value)
            if value_error is not None:
                causes.append((f"metadata.labels[{key}]", _invalid_value(value, value_error)))
        annotations: Mapping[str, str] = meta.get("annotations") or {}
        for key in annotations:
            key_error = _qualified_name_error(key)
            if key_error is not None:
                causes.append(("metadata.annotations", _invalid_value(key, key_error)))
        size = sum(len(key.encode()) + len(value.encode()) for key, value in annotations.items())
        if size > MAX_ANNOTATIONS:
            causes.append(
                (
                    "metadata.annotations",
                    f"Too long: must have at most {MAX_ANNOTATIONS} bytes",
                )
            )
        if resource is self.configmaps:
            causes.extend(_configmap_problems(obj))
        elif resource is self.crds:
            causes.extend(_crd_problems(name, obj))
        if causes:
            raise resource.invalid(name, causes)

    def _fresh_metadata(self, meta: Json) -> Json:
        dropped = {
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
            "selfLink",
            "managedFields",
        }
        return {key: value for key, value in meta.items() if key not in dropped}

    def create(self, resource: Resource, version: str, namespace: str | None, body: Json) -> Json:
        """Create an object from *body* in *namespace*.

        Raises:
            ApiError: 422 for an invalid object, 409 when it exists, 404 when the
                namespace does not.
        """
        meta = self._metadata_of(body)
        name = meta.get("name")
        if not name and isinstance(meta.get("generateName"), str):
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            name = meta["generateName"] + "".join(secrets.choice(alphabet) for _ in range(5))
        if not isinstance(name, str) or not name:
            raise resource.invalid("", [("metadata.name", "Required value: name is required")])
        self._check_type(resource, version, body, name)
        if resource.namespaced:
            assert namespace is not None  # noqa: S101 -- the router gives namespaced paths one
            body_namespace = meta.get("namespace")
            if body_namespace not in (None, "", namespace):
                raise resource.invalid(
                    name,
                    [
                        (
                            "metadata.namespace",
                            _invalid_value(
                                body_namespace,
                                f"does not match the namespace of the request ({namespace!r})",
                            ),
                        )
                    ],
                )
        if meta.get("resourceVersion"):
            raise ApiError(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            )
        obj: Json = {**body, "apiVersion": resource.api_version(version), "kind": resource.kind}
        new_meta = self._fresh_metadata(meta)
        new_meta["name"] = name
        if resource.namespaced:
            new_meta["namespace"] = namespace
        else:
            new_meta.pop("namespace", None)
        new_meta["uid"] = str(uuid.uuid4())
        new_meta["creationTimestamp"] = _now()
        new_meta["generation"] = 1
        obj["metadata"] = new_meta
        if version in resource.status_versions:
            obj.pop("status", None)  # status is written through the status subresource
        if resource is self.namespaces:
            new_meta["labels"] = {
                **(new_meta.get("labels") or {}),
                "kubernetes.io/metadata.name": name,
            }
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        self._validate(resource, name, obj)
        if resource is self.crds:
            spec = obj["spec"]
            served = self.resources.get((spec["group"], spec["names"]["plural"]))
            if served is not None and served.builtin:
                raise resource.invalid(
                    name, [("spec.group", _invalid_value(spec["group"], "names a built-in type"))]
                )
            self._prepare_crd(obj, None)
        key = (namespace or "", name)
        if key in resource.objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource.qualified} "{name}" already exists',
                resource.resource_details(name),
            )
        if resource.namespaced and ("", namespace) not in self.namespaces.objects:
            raise self.namespaces.not_found(namespace or "")
        created = self._commit(resource, _ADDED, key, obj, None)
        if resource is self.crds:
            self._register(created)
        return created

    def get(self, resource: Resource, namespace: str | None, name: str) -> Json:
        """The object *name*.

        Raises:
            ApiError: 404 when there is none.
        """
        obj = resource.objects.get((namespace or "", name))
        if obj is None:
            raise resource.not_found(name)
        return obj

    def replace(
        self,
        resource: Resource,
        version: str,
        namespace: str | None,
        name: str,
        body: Json,
        *,
        status: bool = False,
    ) -> Json:
        """Replace object *name* with *body* (only its status when *status* is true).

        A body with ``metadata.resourceVersion`` replaces only that version. A
        replacement that changes nothing keeps the stored object and its revision.

        Raises:
            ApiError: 404 when it does not exist, 409 when the versions differ, 422
                for an invalid object, 400 when the body names another object.
        """
        meta = self._metadata_of(body)
        body_name = meta.get("name")
        if body_name != name:
            raise ApiError.bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        self._check_type(resource, version, body, name)
        if resource.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise ApiError.bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        key = (namespace or "", name)
        old = resource.objects.get(key)
        if old is None:
            raise resource.not_found(name)
        old_meta = old["metadata"]
        expected = meta.get("resourceVersion")
        if expected and expected != old_meta["resourceVersion"]:
            raise resource.conflict(
                name,
                "the object has been modified; please apply your changes to the latest "
                "version and try again",
            )
        uid = meta.get("uid")
        if uid and uid != old_meta["uid"]:
            raise resource.conflict(
                name,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{old_meta['uid']}",
            )
        if status:
            obj: Json = {**old, "metadata": {**old_meta}}
            if "status" in body:
                obj["status"] = body["status"]
            else:
                obj.pop("status", None)
        else:
            obj = {**body, "apiVersion": resource.api_version(version), "kind": resource.kind}
            new_meta = self._fresh_metadata(meta)
            for kept in ("name", "uid", "creationTimestamp", "generation"):
                new_meta[kept] = old_meta[kept]
            if resource.namespaced:
                new_meta["namespace"] = namespace
            else:
                new_meta.pop("namespace", None)
            new_meta.pop("generateName", None)
            if "generateName" in old_meta:
                new_meta["generateName"] = old_meta["generateName"]
            obj["metadata"] = new_meta
            if version in resource.status_versions or resource is self.crds:
                # The status subresource owns it (a definition's status is the server's).
                if "status" in old:
                    obj["status"] = old["status"]
                else:
                    obj.pop("status", None)
            if resource is self.namespaces:
                new_meta["labels"] = {
                    **(new_meta.get("labels") or {}),
                    "kubernetes.io/metadata.name": name,
                }
                obj["spec"] = old["spec"]
                obj["status"] = old["status"]
        self._validate(resource, name, obj)
        if resource is self.crds:
            immutable = [
                (f"spec.{part}", _invalid_value(obj["spec"].get(part), "field is immutable"))
                for part in ("group", "scope")
                if obj["spec"].get(part) != old["spec"][part]
            ]
            if immutable:
                raise resource.invalid(name, immutable)
            self._prepare_crd(obj, old)
        if _same(obj, old):
            return old
        if _content(obj, resource, version) != _content(old, resource, version):
            obj["metadata"]["generation"] = old_meta["generation"] + 1
        replaced = self._commit(resource, _MODIFIED, key, obj, old)
        if resource is self.crds:
            self._register(replaced)
        return replaced

    def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        options: Json | None,
    ) -> Json:
        """Delete object *name* at once and return it, at the deletion's revision.

        Deleting a namespace deletes everything in it first; deleting a definition
        deletes every object of its type and ends its watches.

        Raises:
            ApiError: 404 when it does not exist, 409 when a precondition fails,
                403 for a namespace that may not be deleted.
        """
        key = (namespace or "", name)
        old = resource.objects.get(key)
        if old is None:
            raise resource.not_found(name)
        old_meta = old["metadata"]
        preconditions = (options or {}).get("preconditions") or {}
        if not isinstance(preconditions, dict):
            raise ApiError.bad_request("preconditions must be a JSON object")
        uid = preconditions.get("uid")
        if uid and uid != old_meta["uid"]:
            raise resource.conflict(
                name,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{old_meta['uid']}",
            )
        expected = preconditions.get("resourceVersion")
        if expected and expected != old_meta["resourceVersion"]:
            raise resource.conflict(
                name,
                f"Precondition failed: ResourceVersion in precondition: {expected}, "
                f"ResourceVersion in object meta: {old_meta['resourceVersion']}",
            )
        if resource is self.namespaces and name in _PROTECTED_NAMESPACES:
            raise ApiError(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                resource.resource_details(name),
            )
        deleted = self._delete_now(resource, key)
        if resource is self.configmaps:
            return _deleted_status(resource, deleted)
        return deleted

    def delete_collection(
        self,
        resource: Resource,
        version: str,
        namespace: str | None,
        query: Mapping[str, str],
    ) -> Json:
        """Delete every object *query*'s selectors select in *namespace*.

        Returns:
            A list of the deleted objects, each at its deletion's revision.

        Raises:
            ApiError: 400 for a malformed selector, 405 for namespaces.
        """
        if resource is self.namespaces:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                {},
            )
        labels = LabelSelector(query.get("labelSelector", ""))
        fields = FieldSelector(query.get("fieldSelector", ""))
        keys = sorted(
            key
            for key, obj in resource.objects.items()
            if (namespace is None or key[0] == namespace)
            and (fields.empty or fields.matches(key[0], key[1]))
            and (labels.empty or labels.matches(_labels(obj)))
        )
        deleted = [self._delete_now(resource, key) for key in keys]
        api_version = resource.api_version(version)
        return {
            "apiVersion": api_version,
            "kind": resource.kind + "List",
            "metadata": {"resourceVersion": str(self.revision)},
            "items": [_in_version(resource, version, obj) for obj in deleted],
        }

    def _delete_now(self, resource: Resource, key: Key) -> Json:
        """Delete the object at *key*, and what goes with it, with no questions asked.

        What is in a namespace goes before the namespace; the objects of a
        definition's type go before the definition, and the type's watches end.
        """
        old = resource.objects[key]
        if resource is self.namespaces:
            for other in self.resources.values():
                if other.namespaced:
                    for other_key in sorted(k for k in other.objects if k[0] == key[1]):
                        self._delete_now(other, other_key)
        elif resource is self.crds:
            target = self.resources.get((old["spec"]["group"], old["spec"]["names"]["plural"]))
            if target is not None:
                for other_key in sorted(target.objects):
                    self._delete_now(target, other_key)
                target.registered = False
                for watch in self.watches:
                    if watch.resource is target:
                        watch.end()
        deleted: Json = {**old, "metadata": {**old["metadata"]}}
        if resource is self.namespaces:
            deleted["metadata"]["deletionTimestamp"] = _now()
            deleted["status"] = {"phase": "Terminating"}
        return self._commit(resource, _DELETED, key, deleted, old)

    # -- definitions ----------------------------------------------------------------------

    def _prepare_crd(self, obj: Json, old: Json | None) -> None:
        """Fill in a definition's defaults and a status that says it is ready."""
        spec = obj["spec"]
        names = spec["names"] = dict(spec["names"])
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
        now = _now()
        conditions = {
            condition["type"]: condition
            for condition in ((old or {}).get("status") or {}).get("conditions", [])
        }

        def condition(kind: str, reason: str, message: str) -> Json:
            previous = conditions.get(kind)
            since = previous["lastTransitionTime"] if previous is not None else now
            return {
                "type": kind,
                "status": "True",
                "lastTransitionTime": since,
                "reason": reason,
                "message": message,
            }

        storage = next(version["name"] for version in spec["versions"] if version.get("storage"))
        stored = list(((old or {}).get("status") or {}).get("storedVersions", []))
        if storage not in stored:
            stored.append(storage)
        obj["status"] = {
            "conditions": [
                condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                condition(
                    "Established", "InitialNamesAccepted", "the initial names have been accepted"
                ),
            ],
            "acceptedNames": dict(names),
            "storedVersions": stored,
        }

    def _register(self, crd: Json) -> None:
        """Serve (or update) the custom type a stored definition describes."""
        spec = crd["spec"]
        names = spec["names"]
        versions = spec["versions"]
        served = tuple(version["name"] for version in versions if version.get("served"))
        with_status = frozenset(
            version["name"]
            for version in versions
            if isinstance(version.get("subresources"), dict) and "status" in version["subresources"]
        )
        key = (spec["group"], names["plural"])
        resource = self.resources.get(key)
        if resource is None:
            resource = self._add(
                Resource(
                    spec["group"],
                    names["plural"],
                    names["kind"],
                    names["singular"],
                    spec["scope"] == "Namespaced",
                    served,
                )
            )
        resource.kind = names["kind"]
        resource.singular = names["singular"]
        resource.namespaced = spec["scope"] == "Namespaced"
        resource.versions = served
        resource.status_versions = with_status
        resource.registered = True

    # -- reads ----------------------------------------------------------------------------

    def state_at(self, resource: Resource, revision: int) -> Mapping[Key, Json]:
        """The collection's objects as they were at *revision* (≥ the compaction revision)."""
        if revision >= self.revision:
            return resource.objects
        state = dict(resource.objects)
        for change in reversed(resource.changes_after(revision)):
            if change.prev is None:
                state.pop(change.key, None)
            else:
                state[change.key] = change.prev
        return state

    def _too_large(self, revision: int) -> ApiError:
        return ApiError(
            504,
            "Timeout",
            f"Too large resource version: {revision}, current: {self.revision}",
            {
                "causes": [
                    {
                        "reason": "ResourceVersionTooLarge",
                        "message": "Too large resource version",
                    }
                ],
                "retryAfterSeconds": 1,
            },
        )

    def list_objects(
        self,
        resource: Resource,
        version: str,
        namespace: str | None,
        query: Mapping[str, str],
    ) -> Json:
        """A list response for *query*'s selectors, pagination and resource version.

        Raises:
            ApiError: 400 for a malformed parameter, 410 for a revision below the
                compaction revision, 504 for one ahead of the current revision.
        """
        labels = LabelSelector(query.get("labelSelector", ""))
        fields = FieldSelector(query.get("fieldSelector", ""))
        limit = _int_param(query, "limit")
        token = query.get("continue", "")
        version_text = query.get("resourceVersion", "")
        match = query.get("resourceVersionMatch", "")
        start: Key | None = None
        if token:
            if version_text not in ("", "0"):
                raise ApiError.bad_request(
                    "specifying resource version is not allowed when using continue"
                )
            at, start = _decode_continue(token)
            if at < self.compacted:
                raise ApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter.",
                )
            if at > self.revision:
                raise ApiError.bad_request(f"continue key is not valid: {token!r}")
        elif match:
            if not version_text:
                raise ApiError.bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided"
                )
            requested = _revision_param(version_text)
            if match == "Exact":
                if requested == 0:
                    raise ApiError.bad_request(
                        'resourceVersionMatch "Exact" is forbidden for resourceVersion "0"'
                    )
                if requested < self.compacted:
                    raise ApiError.expired(requested, self.compacted)
                if requested > self.revision:
                    raise self._too_large(requested)
                at = requested
            elif match == "NotOlderThan":
                if requested > self.revision:
                    raise self._too_large(requested)
                at = self.revision
            else:
                raise ApiError.bad_request(
                    f"invalid resourceVersionMatch {match!r}: must be Exact or NotOlderThan"
                )
        else:
            if version_text not in ("", "0") and _revision_param(version_text) > self.revision:
                raise self._too_large(int(version_text))
            at = self.revision
        state = self.state_at(resource, at)
        keys = sorted(
            key
            for key in state
            if (namespace is None or key[0] == namespace)
            and (start is None or key > start)
            and (fields.empty or fields.matches(key[0], key[1]))
            and (labels.empty or labels.matches(_labels(state[key])))
        )
        list_meta: Json = {"resourceVersion": str(at)}
        if limit and len(keys) > limit:
            list_meta["continue"] = _encode_continue(at, keys[limit - 1])
            if labels.empty and fields.empty:
                list_meta["remainingItemCount"] = len(keys) - limit
            keys = keys[:limit]
        api_version = resource.api_version(version)
        items: list[Json] = []
        for key in keys:
            obj = state[key]
            if resource.builtin:
                # Typed lists leave the items' apiVersion and kind out.
                items.append(
                    {
                        name: value
                        for name, value in obj.items()
                        if name not in ("apiVersion", "kind")
                    }
                )
            else:
                items.append(
                    obj if obj["apiVersion"] == api_version else {**obj, "apiVersion": api_version}
                )
        return {
            "apiVersion": api_version,
            "kind": resource.kind + "List",
            "metadata": list_meta,
            "items": items,
        }

    def open_watch(
        self,
        resource: Resource,
        version: str,
        namespace: str | None,
        query: Mapping[str, str],
    ) -> Watch | ApiError:
        """Register a watch for *query*, its catch-up events already queued.

        Returns the 410 error to send as the only event when the requested
        revision is below the compaction revision.

        Raises:
            ApiError: 400 for a malformed parameter, 504 for a revision ahead of the
                current one.
        """
        labels = LabelSelector(query.get("labelSelector", ""))
        fields = FieldSelector(query.get("fieldSelector", ""))
        bookmarks = _bool_param(query, "allowWatchBookmarks")
        initial = _bool_param(query, "sendInitialEvents")
        version_text = query.get("resourceVersion", "")
        watch_from = None if version_text in ("", "0") else _revision_param(version_text)
        if watch_from is not None and watch_from > self.revision:
            raise self._too_large(watch_from)
        if watch_from is not None and watch_from < self.compacted:
            return ApiError.expired(watch_from, self.compacted)
        watch = Watch(
            resource,
            version=version,
            namespace=namespace,
            labels=labels,
            fields=fields,
            bookmarks=bookmarks,
            sent=self.revision,
        )
        if watch_from is None or initial:
            # The current state (or the state at watch_from) as ADDED events first.
            at = self.revision if watch_from is None else watch_from
            state = self.state_at(resource, at)
            for key in sorted(state):
                if watch.selects(state[key], key):
                    watch.push(at, _INITIAL, state[key])
            watch.push(at, _SYNCED, {"initialEventsEnd": initial})
            if watch_from is not None:
                for change in resource.changes_after(watch_from):
                    watch.offer(change)
        else:
            watch.sent = watch_from
            for change in resource.changes_after(watch_from):
                watch.offer(change)
        self.watches.add(watch)
        return watch

    async def pump(
        self,
        watch: Watch,
        write: Callable[[bytes], Awaitable[None]],
        *,
        duration: float | None = None,
    ) -> None:
        """Send *watch*'s events through *write* until it is closed or ended.

        With *duration* (seconds), it ends then; a watch with bookmarks that has
        sent everything gets a last bookmark at the current revision right before,
        as the API server sends one before it closes a watch on timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = None if duration is None else loop.time() + duration
        while not watch.closed:
            expired = deadline is not None and loop.time() >= deadline
            if watch.queue and not expired:
                await write(self._drain(watch))
                continue
            if watch.ending:
                return
            if expired:
                if watch.bookmarks and not watch.queue:
                    watch.sent = self.revision
                    await write(watch.bookmark_line(watch.sent))
                return
            if watch.bookmarks and self.revision > watch.sent:
                # Let the writes that come right after run first: one bookmark then
                # covers them all, instead of one per write for every idle watch.
                await asyncio.sleep(_BOOKMARK_DELAY)
                if not watch.idle():
                    continue
                watch.sent = self.revision
                await write(watch.bookmark_line(watch.sent))
                continue
            watch.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await watch.wake.wait()

    @staticmethod
    def _drain(watch: Watch) -> bytes:
        """Take queued events off *watch*, up to about :data:`_WRITE_BATCH` bytes of them."""
        chunk = bytearray()
        while watch.queue and len(chunk) < _WRITE_BATCH:
            revision, kind, obj = watch.queue.popleft()
            if kind == _INITIAL:
                assert obj is not None  # noqa: S101 -- pushed with the object
                chunk += watch.event_line(_ADDED, obj)
            elif kind == _SYNCED:
                watch.sent = max(watch.sent, revision)
                if obj and obj.get("initialEventsEnd") and watch.bookmarks:
                    chunk += watch.bookmark_line(revision, initial_events_end=True)
            else:
                assert obj is not None  # noqa: S101 -- pushed with the object
                chunk += watch.event_line(kind, obj)
                watch.sent = max(watch.sent, revision)
        return bytes(chunk)

    def compact(self, revision: int | None = None) -> int:
        """Drop the history through *revision* (default: the current one).

        Raises:
            ApiError: 400 for a revision below the last compaction or ahead of the
                current one.
        """
        target = self.revision if revision is None else revision
        if target < self.compacted:
            raise ApiError.bad_request(
                f"revision {target} has been compacted already (at {self.compacted})"
            )
        if target > self.revision:
            raise ApiError.bad_request(
                f"revision {target} is a future revision (current: {self.revision})"
            )
        for resource in self.resources.values():
            index = bisect.bisect_right(resource.log, target, key=lambda change: change.revision)
            del resource.log[:index]
        self.compacted = target
        return target

    def close_watches(self) -> int:
        """End every open watch stream at once; returns how many there were."""
        watches = list(self.watches)
        for watch in watches:
            watch.close()
        self.watches.clear()
        return len(watches)


def _deleted_status(resource: Resource, deleted: Json) -> Json:
    """What the API server answers for types whose delete does not return the object."""
    meta = deleted["metadata"]
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {**resource.resource_details(meta["name"]), "uid": meta["uid"]},
    }


def _configmap_problems(obj: Json) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for section in ("data", "binaryData"):
        content = obj.get(section)
        if content is None:
            continue
        if not isinstance(content, dict):
            problems.append((section, "Invalid value: must be a JSON object"))
            continue
        for key, value in content.items():
            if len(key) > 253 or not _CONFIGMAP_KEY_RE.fullmatch(key):
                problems.append(
                    (
                        f"{section}[{key}]",
                        _invalid_value(
                            key,
                            "a valid config key must consist of alphanumeric characters, "
                            "'-', '_' or '.'",
                        ),
                    )
                )
            if not isinstance(value, str):
                problems.append((f"{section}[{key}]", "Invalid value: must be a string"))
            elif section == "binaryData":
                try:
                    base64.b64decode(value, validate=True)
                except binascii.Error:
                    problems.append((f"{section}[{key}]", "Invalid value: must be base64"))
    overlap = set(obj.get("data") or {}) & set(obj.get("binaryData") or {})
    problems.extend(
        (f"data[{key}]", _invalid_value(key, "duplicate of key present in binaryData"))
        for key in sorted(overlap)
    )
    return problems


def _crd_problems(name: str, obj: Json) -> list[tuple[str, str]]:
    """What makes a CustomResourceDefinition invalid, as ``(field, message)``."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "Required value")]
    problems: list[tuple[str, str]] = []
    group = spec.get("group")
    if not isinstance(group, str) or not group:
        problems.append(("spec.group", "Required value"))
    elif _dns_subdomain_error(group) is not None or "." not in group:
        problems.append(
            ("spec.group", _invalid_value(group, "should be a domain with at least one dot"))
        )
    names = spec.get("names")
    plural = None
    if not isinstance(names, dict):
        problems.append(("spec.names", "Required value"))
    else:
        plural = names.get("plural")
        for part in ("plural", "singular"):
            value = names.get(part)
            if value is None and part == "singular":
                continue  # defaults to the lower-case kind
            if not isinstance(value, str) or not value:
                problems.append((f"spec.names.{part}", "Required value"))
            elif _dns_label_error(value) is not None:
                problems.append((f"spec.names.{part}", _invalid_value(value, _LABEL_MESSAGE)))
        kind = names.get("kind")
        if not isinstance(kind, str) or not kind:
            problems.append(("spec.names.kind", "Required value"))
        elif kind[0].islower() or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", kind):
            problems.append(
                ("spec.names.kind", _invalid_value(kind, "must be an upper-case identifier"))
            )
        elif names.get("singular") is None and _dns_label_error(kind.lower()) is not None:
            problems.append(("spec.names.singular", "Required value"))
    if isinstance(plural, str) and isinstance(group, str) and name != f"{plural}.{group}":
        problems.append(
            ("metadata.name", _invalid_value(name, 'must be spec.names.plural+"."+spec.group'))
        )
    scope = spec.get("scope")
    if scope not in ("Namespaced", "Cluster"):
        problems.append(
            (
                "spec.scope",
                f"Unsupported value: {json.dumps(scope)}: supported values: "
                '"Cluster", "Namespaced"',
            )
        )
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        problems.append(("spec.versions", "Invalid value: must have at least one version"))
        return problems
    storage = 0
    seen: set[str] = set()
    for index, version in enumerate(versions):
        where = f"spec.versions[{index}]"
        if not isinstance(version, dict):
            problems.append((where, "Invalid value: must be a JSON object"))
            continue
        version_name = version.get("name")
        if not isinstance(version_name, str) or _dns_label_error(version_name) is not None:
            problems.append((f"{where}.name", _invalid_value(version_name, _LABEL_MESSAGE)))
        elif version_name in seen:
            problems.append((f"{where}.name", _invalid_value(version_name, "must be unique")))
        else:
            seen.add(version_name)
        if not isinstance(version.get("served"), bool):
            problems.append((f"{where}.served", "Required value"))
        if not isinstance(version.get("storage"), bool):
            problems.append((f"{where}.storage", "Required value"))
        elif version["storage"]:
            storage += 1
        schema = version.get("schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("openAPIV3Schema"), dict):
            problems.append(
                (f"{where}.schema.openAPIV3Schema", "Required value: schemas are required")
            )
        subresources = version.get("subresources")
        if subresources is not None and not isinstance(subresources, dict):
            problems.append((f"{where}.subresources", "Invalid value: must be a JSON object"))
    if storage != 1:
        problems.append(
            (
                "spec.versions",
                "Invalid value: must have exactly one version marked as storage version",
            )
        )
    return problems


def _content(obj: Json, resource: Resource, version: str) -> Json:
    """What ``generation`` counts: everything outside metadata (and a status subresource)."""
    skip = {"metadata", "apiVersion", "kind"}
    if version in resource.status_versions or resource.builtin:
        skip.add("status")
    return {key: value for key, value in obj.items() if key not in skip}


def _same(new: Json, old: Json) -> bool:
    """Whether a replacement changes nothing the API server would store."""
    new_meta, old_meta = new["metadata"], old["metadata"]
    for name in ("labels", "annotations", "finalizers", "ownerReferences"):
        if (new_meta.get(name) or None) != (old_meta.get(name) or None):
            return False
    skip = {"metadata", "apiVersion"}
    return {k: v for k, v in new.items() if k not in skip} == {
        k: v for k, v in old.items() if k not in skip
    }


# -- HTTP ----------------------------------------------------------------------------------

_KEY_API: Final = web.AppKey("kubeapi", KubeApi)


def _json(body: Json, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


async def _read_json(request: web.Request, *, required: bool = True) -> Json | None:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _too_large()
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large() from None
    if not raw.strip():
        if required:
            raise ApiError.bad_request("the request body is empty; expected a JSON object")
        return None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError.bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError.bad_request("the request body must be a JSON object")
    return body


def _too_large() -> ApiError:
    return ApiError(
        413, "RequestEntityTooLarge", f"the request body is larger than {MAX_BODY} bytes"
    )


def _method_not_allowed(request: web.Request) -> ApiError:
    return ApiError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method on the requested resource: {request.method}",
        {},
    )


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    api = request.app[_KEY_API]
    if api.token is not None:
        presented = request.headers.get("Authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {api.token}".encode()):
            return _json(ApiError(401, "Unauthorized", "Unauthorized").status(), 401)
    try:
        return await handler(request)
    except ApiError as error:
        return _json(error.status(), error.code)
    except web.HTTPException:
        raise
    except Exception as exc:  # a stand-in bug: report it like the API server would
        logger.exception("%s %s failed", request.method, request.path)
        internal = ApiError(500, "InternalError", f"internal error: {exc!r}")
        return _json(internal.status(), 500)


async def _dispatch(request: web.Request) -> web.StreamResponse:
    api = request.app[_KEY_API]
    parts = [part for part in request.path.split("/") if part]
    method = request.method
    if parts and parts[0] == "_standin":
        return await _standin(api, request, parts[1:])
    if parts == ["version"]:
        _only(request, "GET")
        return _json(
            {
                "major": "1",
                "minor": "31",
                "gitVersion": GIT_VERSION,
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2024-08-13T00:00:00Z",
                "goVersion": "go1.22.5",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )
    if parts == ["api"]:
        _only(request, "GET")
        return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
    if parts == ["apis"]:
        _only(request, "GET")
        return _json(_group_list(api))
    if len(parts) >= 2 and parts[0] == "api":
        if parts[1] != "v1":
            raise ApiError.not_found_path()
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 2 and parts[0] == "apis":
        if len(parts) == 2:
            _only(request, "GET")
            return _json(_group(api, parts[1]))
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError.not_found_path()
    if not rest:
        _only(request, "GET")
        return _json(_resource_list(api, group, version))
    namespace: str | None = None
    # namespaces/<ns>/<plural>..., except a namespace's own subresources.
    if (
        len(rest) >= 3
        and rest[0] == "namespaces"
        and not (group == "" and rest[2] in ("status", "finalize"))
    ):
        namespace, rest = rest[1], rest[2:]
    if len(rest) > 3:
        raise ApiError.not_found_path()
    resource = api.resource(group, version, rest[0])
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) == 3 else None
    if namespace is not None and not resource.namespaced:
        raise ApiError.not_found_path()
    if namespace is None and resource.namespaced and name is not None:
        raise ApiError.not_found_path()
    if subresource is not None and (
        subresource != "status" or version not in resource.status_versions
    ):
        raise ApiError.not_found_path()
    query = request.query
    if name is None:
        if method == "GET":
            if _bool_param(query, "watch"):
                return await _watch(api, request, resource, version, namespace)
            return _json(api.list_objects(resource, version, namespace, query))
        if method == "POST":
            if resource.namespaced and namespace is None:
                raise _method_not_allowed(request)
            body = await _read_json(request)
            assert body is not None  # noqa: S101 -- required
            return _json(api.create(resource, version, namespace, body), 201)
        if method == "DELETE" and not (resource.namespaced and namespace is None):
            await _read_json(request, required=False)  # DeleteOptions: nothing to honour
            return _json(api.delete_collection(resource, version, namespace, query))
        raise _method_not_allowed(request)
    if method == "GET":
        return _json(_in_version(resource, version, api.get(resource, namespace, name)))
    if method == "PUT":
        body = await _read_json(request)
        assert body is not None  # noqa: S101 -- required
        replaced = api.replace(
            resource, version, namespace, name, body, status=subresource is not None
        )
        return _json(_in_version(resource, version, replaced))
    if method == "DELETE" and subresource is None:
        options = await _read_json(request, required=False)
        deleted = api.delete(resource, namespace, name, options)
        return _json(_in_version(resource, version, deleted))
    raise _method_not_allowed(request)


def _only(request: web.Request, method: str) -> None:
    if request.method != method:
        raise _method_not_allowed(request)


def _in_version(resource: Resource, version: str, obj: Json) -> Json:
    if obj.get("kind") == "Status":
        return obj
    api_version = resource.api_version(version)
    return obj if obj.get("apiVersion") == api_version else {**obj, "apiVersion": api_version}


def _group_list(api: KubeApi) -> Json:
    groups: dict[str, list[str]] = {}
    for resource in api.resources.values():
        if resource.group and resource.registered:
            versions = groups.setdefault(resource.group, [])
            versions.extend(v for v in resource.versions if v not in versions)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": group,
                "versions": [
                    {"groupVersion": f"{group}/{version}", "version": version}
                    for version in versions
                ],
                "preferredVersion": {
                    "groupVersion": f"{group}/{versions[0]}",
                    "version": versions[0],
                },
            }
            for group, versions in sorted(groups.items())
            if versions
        ],
    }


def _group(api: KubeApi, name: str) -> Json:
    for group in _group_list(api)["groups"]:
        if group["name"] == name:
            return {"kind": "APIGroup", "apiVersion": "v1", **group}
    raise ApiError.not_found_path()


def _resource_list(api: KubeApi, group: str, version: str) -> Json:
    resources: list[Json] = []
    for resource in api.resources.values():
        if resource.group != group or not resource.registered or version not in resource.versions:
            continue
        resources.append(
            {
                "name": resource.plural,
                "singularName": resource.singular,
                "namespaced": resource.namespaced,
                "kind": resource.kind,
                "verbs": ["create", "delete", "get", "list", "update", "watch"],
            }
        )
        if version in resource.status_versions:
            resources.append(
                {
                    "name": f"{resource.plural}/status",
                    "singularName": "",
                    "namespaced": resource.namespaced,
                    "kind": resource.kind,
                    "verbs": ["get", "update"],
                }
            )
    if not resources:
        raise ApiError.not_found_path()
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


async def _watch(
    api: KubeApi,
    request: web.Request,
    resource: Resource,
    version: str,
    namespace: str | None,
) -> web.StreamResponse:
    timeout = _int_param(request.query, "timeoutSeconds") or None  # 0: no limit
    # No await between opening the watch (its catch-up computed) and registering
    # it: every later write reaches its queue.
    opened = api.open_watch(resource, version, namespace, request.query)
    response = web.StreamResponse(
        headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
    )
    response.enable_chunked_encoding()
    if isinstance(opened, ApiError):
        # The API server reports a too old revision as the stream's only event.
        await response.prepare(request)
        line = {"type": "ERROR", "object": opened.status()}
        await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response
    watch = opened
    try:
        await response.prepare(request)
        await api.pump(watch, response.write, duration=timeout)
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away
    finally:
        api.watches.discard(watch)
    return response


async def _standin(api: KubeApi, request: web.Request, parts: list[str]) -> web.StreamResponse:
    if parts == ["compact"]:
        _only(request, "POST")
        body = await _read_json(request, required=False) or {}
        revision = body.get("revision")
        if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int)):
            raise ApiError.bad_request(f"revision must be an integer, got {revision!r}")
        compacted = api.compact(revision)
        return _json({"revision": api.revision, "compacted": compacted})
    if parts == ["close-watches"]:
        _only(request, "POST")
        return _json({"closed": api.close_watches()})
    if parts == ["state"]:
        _only(request, "GET")
        return _json(
            {"revision": api.revision, "compacted": api.compacted, "watches": len(api.watches)}
        )
    raise ApiError.not_found_path()


def create_app(api: KubeApi) -> web.Application:
    """The aiohttp application serving *api* (requests up to :data:`MAX_BODY` bytes)."""
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_BODY)
    app[_KEY_API] = api
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


# -- the child process ---------------------------------------------------------------------


async def _serve(args: argparse.Namespace, token: str | None) -> None:
    api = KubeApi(token=token, initial_revision=args.initial_revision)
    ssl_context = None
    if args.cert_file is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.cert_file, args.key_file)
    # Cancelling the handler of a request whose client went away ends its watch.
    runner = web.AppRunner(
        create_app(api), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=ssl_context)
    await site.start()
    logger.info("serving on 127.0.0.1:%d, revision %d", args.port, api.revision)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        api.close_watches()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Serve the stand-in on 127.0.0.1 until SIGTERM or SIGINT.

    Args:
        argv: the command line (``sys.argv[1:]`` by default); see ``--help``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m kds.testing.kubeapi",
        description="An in-memory Kubernetes API server stand-in for tests (127.0.0.1 only).",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--cert-file", help="PEM server certificate; serve HTTPS with it")
    parser.add_argument("--key-file", help="PEM private key of --cert-file")
    parser.add_argument(
        "--token-file", help="file holding the bearer token every request must present"
    )
    parser.add_argument(
        "--initial-revision",
        type=int,
        help="revision before the first write (default: random in [1000, 100000])",
    )
    args = parser.parse_args(argv)
    if (args.cert_file is None) != (args.key_file is None):
        parser.error("--cert-file and --key-file go together")
    token = None
    if args.token_file is not None:
        token = Path(args.token_file).read_text().strip()
        if not token:
            parser.error(f"{args.token_file} is empty")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(args, token))


# -- the parent side -----------------------------------------------------------------------


class _Generated(enum.Enum):
    TOKEN = enum.auto()


GENERATED: Final = _Generated.TOKEN
"""``KubeApiServer(token=GENERATED)``, the default: a new random bearer token."""


def _write_private(path: Path, content: str | bytes) -> None:
    path.unlink(missing_ok=True)
    # Created with mode 0600 from the start: it holds a secret.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content.encode() if isinstance(content, str) else content)


class KubeApiServer(ServerProcess):
    """The Kubernetes API stand-in in a child process, on a free 127.0.0.1 port.

    Use it as a context manager, or call :meth:`start` and :meth:`cleanup`. Its
    directory holds the certificate and key (``tls.crt``, ``tls.key``), the token,
    the :attr:`kubeconfig` and the server's log; secrets are mode 0600. Every
    start is a new, empty API (only ``default`` and ``kube-system``).

    Args:
        directory: where to put its files; a new temporary directory by default.
        tls: serve HTTPS with a self-signed certificate (:attr:`ca_file`); plain
            HTTP when false.
        token: the bearer token clients must present: a new random one by default
            (:data:`GENERATED`), the given string, or ``None`` to accept every client.
        initial_revision: the revision before the first write; random in
            [1000, 100000] by default.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        tls: bool = True,
        token: str | _Generated | None = GENERATED,
        initial_revision: int | None = None,
    ) -> None:
        if isinstance(token, str) and (not token or any(c.isspace() for c in token)):
            raise ValueError("token must be a non-empty string without whitespace")
        if initial_revision is not None and initial_revision < 0:
            raise ValueError(f"initial_revision must not be negative, got {initial_revision}")
        self.directory, self._owns_directory = server_directory(directory, "kds-kubeapi-")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log = self.directory / "kubeapi.log"
        self._tls = tls
        self._token = secrets.token_urlsafe(32) if token is GENERATED else token
        self._initial_revision = initial_revision
        self._cert_file = self.directory / "tls.crt"
        self._key_file = self.directory / "tls.key"
        self._token_file = self.directory / "token"
        self._kubeconfig = self.directory / "kubeconfig"
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"KubeApiServer({self.url}, {str(self.directory)!r})"

    @property
    def url(self) -> str:
        """The server's address: ``https://127.0.0.1:<port>`` (``http://`` without TLS)."""
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}"

    @property
    def token(self) -> str | None:
        """The bearer token clients must present, or ``None`` when any client is welcome."""
        return self._token

    @property
    def ca_file(self) -> Path | None:
        """The PEM certificate clients must trust (self-signed), or ``None`` without TLS."""
        return self._cert_file if self._tls else None

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig file (mode 0600) for this server, written by :meth:`start`.

        One cluster (``server``, ``certificate-authority``), one user (``token``)
        and one context, the current one, whose namespace is ``default``.
        """
        return self._kubeconfig

    def start(self) -> None:
        """Start the server; returns once it answers ``GET /version``.

        Raises:
            RuntimeError: the server exited or did not answer in time; the message
                ends with its log.
        """
        if self.pid is not None:
            return
        command = [
            sys.executable,
            # kds.testing may import this module before runpy runs it: harmless here.
            "-W",
            "ignore::RuntimeWarning:runpy",
            "-m",
            "kds.testing.kubeapi",
            "--port",
            str(self.port),
        ]
        if self._tls:
            if not self._cert_file.is_file():
                certificate, key = generate_certificate(
                    ["localhost", "127.0.0.1"], common_name="kds-kubeapi"
                )
                _write_private(self._key_file, key)
                self._cert_file.write_bytes(certificate)
            command += ["--cert-file", str(self._cert_file), "--key-file", str(self._key_file)]
        if self._token is not None:
            _write_private(self._token_file, self._token)
            command += ["--token-file", str(self._token_file)]
        if self._initial_revision is not None:
            command += ["--initial-revision", str(self._initial_revision)]
        self._write_kubeconfig()
        log = self.log.open("ab")
        try:
            self._process = subprocess.Popen(  # noqa: S603 -- our module, our arguments
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C aimed at the tests is not aimed at it
            )
        finally:
            log.close()
        self._wait_ready()

    def _write_kubeconfig(self) -> None:
        cluster: Json = {"server": self.url}
        if self._tls:
            cluster["certificate-authority"] = str(self._cert_file)
        user: Json = {} if self._token is None else {"token": self._token}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kds-standin", "cluster": cluster}],
            "users": [{"name": "kds-standin", "user": user}],
            "contexts": [
                {
                    "name": "kds-standin",
                    "context": {
                        "cluster": "kds-standin",
                        "user": "kds-standin",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "kds-standin",
            "preferences": {},
        }
        _write_private(self._kubeconfig, yaml.safe_dump(config, sort_keys=False))

    def _client(self) -> httpx.Client:
        headers = {} if self._token is None else {"Authorization": f"Bearer {self._token}"}
        verify: ssl.SSLContext | bool = False
        if self._tls:
            verify = ssl.create_default_context(cafile=str(self._cert_file))
        return httpx.Client(
            base_url=self.url, headers=headers, verify=verify, timeout=_HELPER_TIMEOUT
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        with self._client() as client:
            while True:
                process = self._process
                if process is None or process.poll() is not None:
                    self._process = None
                    raise RuntimeError(f"{self} exited while starting:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/version", timeout=1.0).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self._signal(signal.SIGKILL)
                    raise RuntimeError(f"{self} did not start in time:\n{self.log_tail()}")
                time.sleep(0.02)  # polling an external process; there is nothing to wait on

    def _call(self, method: str, path: str, body: Json | None = None) -> Json:
        if self.pid is None:
            raise RuntimeError(f"{self} is not running")
        with self._client() as client:
            response = client.request(method, path, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        result: Json = response.json()
        return result

    def compact(self, revision: int | None = None) -> int:
        """Drop the history through *revision* (default: the current revision).

        Afterwards lists at ``Exact`` revisions below it and watches from
        revisions below it get 410 Expired, as after etcd's compaction.

        Returns:
            The compaction revision.

        Raises:
            RuntimeError: the server is not running, or refused (a revision below the
                last compaction or ahead of the current one).
        """
        body = {} if revision is None else {"revision": revision}
        compacted: int = self._call("POST", "/_standin/compact", body)["compacted"]
        return compacted

    def close_watches(self) -> int:
        """End every open watch stream at once, as a dropped connection would.

        Returns:
            How many streams were ended.

        Raises:
            RuntimeError: the server is not running.
        """
        closed: int = self._call("POST", "/_standin/close-watches")["closed"]
        return closed

    def state(self) -> dict[str, int]:
        """The server's counters: ``revision``, ``compacted`` and open ``watches``.

        Raises:
            RuntimeError: the server is not running.
        """
        return {key: int(value) for key, value in self._call("GET", "/_standin/state").items()}

    def log_tail(self, lines: int = 30) -> str:
        """The last *lines* lines of the server's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers) and wait for it."""
        self._signal(signal.SIGTERM)

    def _signal(self, signum: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_TIMEOUT)
        self._process = None

    def cleanup(self) -> None:
        """Stop the server and delete its directory (if this object created it)."""
        try:
            self.stop()
        finally:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)


if __name__ == "__main__":
    main()
