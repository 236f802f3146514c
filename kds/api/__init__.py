"""The control plane's HTTP API: the server, and the resource representation it shares.

:class:`ApiServer` serves a store over HTTP (aiohttp): resources by type and mesh,
zone overviews, status, the configuration and an OpenAPI document. The functions of
:mod:`kds.api.representation` turn resources into the API's JSON documents and back;
kdsctl reads and writes its YAML files with them too. ``docs/api.md`` is the reference.
"""

from kds.api.representation import METADATA_KEYS as METADATA_KEYS
from kds.api.representation import format_time as format_time
from kds.api.representation import from_json as from_json
from kds.api.representation import to_json as to_json
from kds.api.representation import type_path as type_path
from kds.api.server import ApiServer as ApiServer
from kds.api.server import is_loopback as is_loopback

__all__ = [
    "METADATA_KEYS",
    "ApiServer",
    "format_time",
    "from_json",
    "is_loopback",
    "to_json",
    "type_path",
]
