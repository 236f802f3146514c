"""One end of a gRPC session in a process of its own, for tests that kill or freeze it.

``python -m tests.integration.grpc_child global WORK_DIR KEEPALIVE`` serves echo
sessions with TLS (certificate generated in WORK_DIR) on 127.0.0.1, prints the
address it listens on, and runs until killed.

``python -m tests.integration.grpc_child zone ADDRESS CA_FILE KEEPALIVE`` dials
ADDRESS, sends ``hello``, prints ``connected`` and waits until killed.

KEEPALIVE is the keepalive interval and timeout, in seconds.
"""

from __future__ import annotations

import sys

import anyio

from kds_transports.grpc import GrpcTransport


async def _global(work_dir: str, keepalive: float) -> None:
    transport = GrpcTransport.server(
        "grpcs://127.0.0.1:0",
        work_dir=work_dir,
        keepalive_interval=keepalive,
        keepalive_timeout=keepalive,
        keepalive_min_interval=0,
    )

    async def echo(session):
        async for frame in session:
            await session.send(frame)

    async with anyio.create_task_group() as task_group:
        address = await task_group.start(transport.serve, echo)
        print(address, flush=True)  # noqa: T201 -- the parent reads it


async def _zone(address: str, ca_file: str, keepalive: float) -> None:
    transport = GrpcTransport.client(
        address, ca_file=ca_file, keepalive_interval=keepalive, keepalive_timeout=keepalive
    )
    session = await transport.connect()
    await session.send(b"hello")
    print("connected", flush=True)  # noqa: T201 -- the parent reads it
    await anyio.sleep_forever()


def main(argv: list[str]) -> None:
    """Run the role *argv* names; see the module's docstring."""
    if argv[0] == "global":
        anyio.run(_global, argv[1], float(argv[2]))
    else:
        anyio.run(_zone, argv[1], argv[2], float(argv[3]))


if __name__ == "__main__":
    main(sys.argv[1:])
