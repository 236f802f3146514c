"""A zone control plane in a process of its own, for tests that run planes apart.

``python -m tests.sync.plane --store PATH --zone NAME --address grpcs://... --ca FILE``
replicates the SQLite store at PATH with the global over gRPC until it is terminated
(SIGTERM: it stops cleanly and exits 0) or killed; ``--store-spec JSON`` opens any
other store from a :class:`~kds.testing.StoreSpec` (``{"backend": ..., "kwargs": ...}``)
instead;
``--transport nats --address nats://... --prefix PREFIX`` does so through NATS.
Other options tune it as a test needs: the store's ``--synchronous`` mode and
``--poll-interval``, any field of :class:`~kds.sync.SyncOptions`
(``--sync-option heartbeat_interval=0.1``, repeatable), the transport's
``--connect-timeout``, the NATS ``--keepalive`` (interval and timeout), and a
``--log-level`` for stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from kds.sync import SyncOptions, ZoneEngine
from kds.testing import StoreSpec
from kds_stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kds.transport import Transport

# Short timings, as the in-process tests use: a lost session is noticed quickly.
OPTIONS = SyncOptions(
    heartbeat_interval=0.1, heartbeat_timeout=1.0, reconnect_base=0.01, reconnect_max=0.2
)


def sync_options(overrides: Mapping[str, str]) -> SyncOptions:
    """:data:`OPTIONS` with *overrides* (field name -> value as text) applied."""
    fields = attrs.fields_dict(SyncOptions)
    values: dict[str, Any] = {}
    for name, text in overrides.items():
        if name not in fields:
            raise ValueError(f"SyncOptions has no field {name!r}; it has {', '.join(fields)}")
        # Each field's default tells its type: seconds are floats, counts and sizes ints.
        values[name] = type(getattr(OPTIONS, name))(text)
    return attrs.evolve(OPTIONS, **values)


def transport(args: argparse.Namespace) -> Transport:
    """The zone's transport to the global, as the arguments say."""
    options: dict[str, Any] = {}  # only those given: the transport's defaults otherwise
    if args.connect_timeout is not None:
        options["connect_timeout"] = args.connect_timeout
    # Each imported only when used: a zone process need not pay for the other.
    if args.transport == "nats":
        from kds_transports.nats import NatsTransport

        if args.prefix is not None:
            options["prefix"] = args.prefix
        if args.keepalive is not None:
            options["keepalive_interval"] = options["keepalive_timeout"] = args.keepalive
        return NatsTransport.client(args.address, zone=args.zone, **options)
    from kds_transports.grpc import GrpcTransport

    return GrpcTransport.client(args.address, zone=args.zone, ca_file=args.ca, **options)


async def run(args: argparse.Namespace) -> None:
    """Replicate until SIGTERM."""
    options = sync_options(dict(args.sync_option))
    if args.store_spec is not None:
        spec = json.loads(args.store_spec)
        store = StoreSpec(spec["backend"], spec.get("kwargs", {})).create()
    else:
        store = SQLiteStore(
            args.store, poll_interval=args.poll_interval, synchronous=args.synchronous
        )
    async with store, anyio.create_task_group() as group:
        engine = ZoneEngine(store, transport(args), zone=args.zone, options=options)
        group.start_soon(engine.run)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        group.cancel_scope.cancel()


def _name_and_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def main() -> None:
    """Parse the arguments and run the zone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="a SQLite file")
    where.add_argument("--store-spec", help="any store, as StoreSpec JSON")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--transport", choices=["grpc", "nats"], default="grpc")
    parser.add_argument("--address", required=True)
    parser.add_argument("--ca", help="gRPC: the global's certificate (required)")
    parser.add_argument("--prefix", help="NATS: the subject prefix (default kds)")
    parser.add_argument(
        "--keepalive", type=float, help="NATS: keepalive interval and timeout, seconds"
    )
    parser.add_argument("--synchronous", choices=["normal", "full"], default="full")
    parser.add_argument("--poll-interval", type=float, default=0.02)
    parser.add_argument(
        "--sync-option", type=_name_and_value, action="append", default=[], metavar="NAME=VALUE"
    )
    parser.add_argument("--connect-timeout", type=float, help="seconds; the transport's default")
    # Warnings only by default: a parent that leaves stderr to a pipe it never reads
    # must not see the child block on a full pipe.
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    if args.transport == "grpc":
        if args.ca is None:
            parser.error("--ca is required with --transport grpc")
        for name in ("prefix", "keepalive"):
            if getattr(args, name) is not None:
                parser.error(f"--{name} applies to --transport nats only")
    elif args.ca is not None:
        parser.error("--ca applies to --transport grpc only")
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.zone} %(levelname)s %(name)s: %(message)s",
    )
    anyio.run(run, args)


if __name__ == "__main__":
    main()
