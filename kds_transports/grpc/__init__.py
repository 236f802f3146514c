"""The gRPC transport: kds sessions over ``grpc.aio``, the default zone-global link.

Needs the ``grpc`` extra (``pip install 'kds[grpc]'``: grpcio and cryptography).

On the global::

    transport = GrpcTransport.server("grpcs://0.0.0.0:5685", work_dir="/var/lib/kds")

On a zone::

    transport = GrpcTransport.client(
        "grpcs://global.example:5685", zone="zone-1", ca_file="/etc/kds/global.crt"
    )
"""

from kds_transports.grpc._session import GrpcSession as GrpcSession
from kds_transports.grpc._transport import DEFAULT_ADDRESS as DEFAULT_ADDRESS
from kds_transports.grpc._transport import DEFAULT_PORT as DEFAULT_PORT
from kds_transports.grpc._transport import METHOD as METHOD
from kds_transports.grpc._transport import Authenticate as Authenticate
from kds_transports.grpc._transport import GrpcClientOptions as GrpcClientOptions
from kds_transports.grpc._transport import GrpcServerOptions as GrpcServerOptions
from kds_transports.grpc._transport import GrpcTransport as GrpcTransport

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "METHOD",
    "Authenticate",
    "GrpcClientOptions",
    "GrpcServerOptions",
    "GrpcSession",
    "GrpcTransport",
]
