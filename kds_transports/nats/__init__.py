"""The NATS transport: kds sessions through a NATS deployment (nats-py).

Needs the ``nats`` extra (``pip install 'kds[nats]'``). Zones behind NAT reach
the global through NATS (a cluster, leaf nodes) instead of dialling the global's
port 5685; several globals on one NATS share the zones between them, each
session served by exactly one. See ``docs/nats.md``.

How sessions keep the Transport contract on NATS core (details in
:mod:`kds_transports.nats._session`, the message format in
:mod:`kds_transports.nats.wire`):

* a zone asks for a session on ``<prefix>.connect``, where globals listen in one
  queue group: NATS hands each request to exactly one global (HA), whose
  ``authenticate`` hook sees the zone's name and credentials as over gRPC;
* frames flow on ``<prefix>.s.<id>.z2g`` and ``.g2z``; every message is
  numbered, and a gap (NATS core delivers at most once) ends the session with
  "messages lost" instead of passing on a stream with a hole in it;
* frames longer than the servers' ``max_payload`` travel in parts;
* senders wait for credit the receiver returns as its application receives, so
  no NATS buffer overflows; keepalive messages detect dead peers; a lost NATS
  connection ends every session on it.

On the global::

    transport = NatsTransport.server(
        "tls://nats.example:4222", ca_file="/etc/kds/nats-ca.crt", user="global", password=...
    )

On a zone::

    transport = NatsTransport.client(
        "tls://nats.example:4222", zone="zone-1", credentials=zone_token,
        ca_file="/etc/kds/nats-ca.crt", user="zone-1", password=...
    )
"""

from kds_transports.nats._session import NatsSession as NatsSession
from kds_transports.nats._transport import DEFAULT_ADDRESS as DEFAULT_ADDRESS
from kds_transports.nats._transport import DEFAULT_PORT as DEFAULT_PORT
from kds_transports.nats._transport import DEFAULT_PREFIX as DEFAULT_PREFIX
from kds_transports.nats._transport import DEFAULT_WINDOW as DEFAULT_WINDOW
from kds_transports.nats._transport import Authenticate as Authenticate
from kds_transports.nats._transport import NatsClientOptions as NatsClientOptions
from kds_transports.nats._transport import NatsConnectionOptions as NatsConnectionOptions
from kds_transports.nats._transport import NatsServerOptions as NatsServerOptions
from kds_transports.nats._transport import NatsTransport as NatsTransport

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "DEFAULT_PREFIX",
    "DEFAULT_WINDOW",
    "Authenticate",
    "NatsClientOptions",
    "NatsConnectionOptions",
    "NatsServerOptions",
    "NatsSession",
    "NatsTransport",
]
