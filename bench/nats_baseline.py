"""Baseline: raw nats-py publish -> subscribe, one publisher, subscribers in processes of their own.

Run it as a script (it is not a test)::

    python bench/nats_baseline.py [--subscribers 10] [--size 120000] [--latency-size 400]

or call :func:`measure` from another benchmark (``sync_bench.py`` does, with the
message sizes kds sent over NATS in the same run). It starts its own NATS server
(:class:`kds.testing.NatsServer`) unless given one's address.

What it measures, and why it compares fairly with kds sessions over NATS:

* **Rate.** The publisher sends *count* messages of *size* bytes on one subject,
  as fast as nats-py takes them; the rate runs from the first publish to the
  last subscriber's acknowledgement of the last message. Like a kds session's
  credit, a window bounds what may be unacknowledged (each subscriber publishes
  its cumulative count every quarter window), so that no NATS buffer overflows
  and no slow consumer is dropped: nothing is lost, and NATS core would lose
  rather than wait. It is measured to one subscriber (as a zone alone with the
  global) and to all of them at once.
* **Latency.** One message of *latency_size* bytes at a time: the time from the
  publish to each subscriber's callback (both read ``CLOCK_MONOTONIC``, which is
  one clock for every process of the machine), the next message once every
  subscriber has answered. p50 and p99 over all deliveries.
* **CPU.** User plus system CPU time of the publisher, the subscribers and
  ``nats-server``, per message (per subscriber for the subscribers).

Everything a kds session adds is left out: no sequence check, no reassembly,
no store, no encoding -- the messages are opaque bytes, delivered once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import attrs
from nats.aio.client import Client

if TYPE_CHECKING:
    from collections.abc import Sequence

    from nats.aio.msg import Msg

__all__ = ["RawLatency", "RawRate", "RawResults", "measure", "process_cpu_seconds"]

MESSAGE: Final = struct.Struct(">BQq")
"""What the publisher puts first in a message: kind, sequence, a value (see the kinds)."""
ANSWER: Final = struct.Struct(">BHQq")
"""A subscriber's answer: kind, its index, sequence, a value."""

DATA: Final = 0  # value: acknowledge when the sequence is a multiple of it
PROBE: Final = 1  # value: CLOCK_MONOTONIC nanoseconds at publish; answered with the latency

DEFAULT_WINDOW: Final = 4 * 1024 * 1024  # bytes unacknowledged, as a kds session's credit
_TIMEOUT: Final = 300.0  # seconds any one measurement may take


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process *pid* (all its threads), from /proc."""
    # Fields after the command name (which may contain spaces, so split after ")").
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class RawRate:
    """Messages delivered per second, to each of *subscribers* subscribers.

    Attributes:
        subscribers: how many received every message.
        size: bytes per message.
        messages_per_second: per subscriber.
        publisher_cpu: seconds of publisher CPU per message.
        subscriber_cpu: seconds of subscriber CPU per message and subscriber.
        server_cpu: seconds of ``nats-server`` CPU per message (all deliveries).
    """

    subscribers: int
    size: int
    messages_per_second: float
    publisher_cpu: float
    subscriber_cpu: float
    server_cpu: float

    @property
    def bytes_per_second(self) -> float:
        """Payload bytes per second, per subscriber."""
        return self.messages_per_second * self.size


@attrs.frozen
class RawLatency:
    """Publish -> callback latency to every subscriber, one message at a time.

    Attributes:
        subscribers: how many received every message.
        size: bytes per message.
        p50: median over every delivery, in seconds.
        p99: 99th percentile over every delivery, in seconds.
        slowest_p99: 99th percentile of each message's slowest delivery, in seconds.
    """

    subscribers: int
    size: int
    p50: float
    p99: float
    slowest_p99: float


@attrs.frozen
class RawResults:
    """What :func:`measure` found."""

    rate_one: RawRate
    rate_all: RawRate
    latency: RawLatency


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which *fraction* of *values* lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


# -- a subscriber (child process) -------------------------------------------------------


async def run_subscriber(url: str, prefix: str, index: int) -> None:
    """Answer the publisher's messages until SIGTERM; prints ``ready`` once subscribed."""
    client = Client()
    await client.connect(url, allow_reconnect=False, name=f"raw subscriber {index}")
    answers = f"{prefix}.answers"
    received = 0

    async def on_message(message: Msg) -> None:
        nonlocal received
        kind, sequence, value = MESSAGE.unpack_from(message.data)
        if kind == PROBE:
            latency = time.monotonic_ns() - value
            await client.publish(answers, ANSWER.pack(PROBE, index, sequence, latency))
            return
        received = 1 if sequence == 1 else received + 1  # sequence 1 starts a measurement
        if sequence % value == 0:
            # How many arrived, not the sequence: a gap would show as a shortfall.
            await client.publish(answers, ANSWER.pack(DATA, index, sequence, received))

    await client.subscribe(f"{prefix}.all", cb=on_message)
    await client.subscribe(f"{prefix}.one.{index}", cb=on_message)
    await client.flush()
    print("ready", flush=True)
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            break
    await client.close()


# -- the publisher ------------------------------------------------------------------------


class Subscribers:
    """The subscriber processes, started at once and each ready when this returns."""

    def __init__(self, url: str, prefix: str, count: int) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        try:
            for index in range(count):
                self.processes.append(
                    subprocess.Popen(  # noqa: S603 -- this script, this interpreter
                        [
                            *(sys.executable, __file__, "--role", "subscriber", "--url", url),
                            *("--prefix", prefix, "--index", str(index)),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            for process in self.processes:
                assert process.stdout is not None  # noqa: S101 -- piped above
                if process.stdout.readline().strip() != "ready":
                    raise RuntimeError("a raw nats-py subscriber did not start")
        except BaseException:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        """CPU seconds all subscribers used so far."""
        return sum(process_cpu_seconds(process.pid) for process in self.processes)

    def stop(self) -> None:
        """SIGTERM each, and wait for it."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class _Publisher:
    """The publishing side: its connection, and the subscribers' answers."""

    def __init__(self, client: Client, prefix: str, subscribers: int) -> None:
        self.client = client
        self.prefix = prefix
        self.subscribers = subscribers
        self.counted = [0] * subscribers  # DATA messages each acknowledged having received
        self.acknowledged = [0] * subscribers  # the sequence of each one's last DATA answer
        self.probes: dict[int, list[int]] = {}  # sequence -> latencies (ns) answered
        self.changed = anyio.Event()

    async def on_answer(self, message: Msg) -> None:
        kind, index, sequence, value = ANSWER.unpack_from(message.data)
        if kind == PROBE:
            self.probes.setdefault(sequence, []).append(value)
        else:
            self.acknowledged[index] = sequence
            self.counted[index] = value
        self.changed.set()
        self.changed = anyio.Event()

    async def rate(self, subscribers: int, size: int, count: int, window: int) -> float:
        """Send *count* DATA messages of *size* bytes to the first *subscribers*; seconds taken."""
        everyone = subscribers == self.subscribers
        subject = f"{self.prefix}.all" if everyone else f"{self.prefix}.one.0"
        in_flight = max(4, window // size)  # messages the window allows unacknowledged
        every = max(1, in_flight // 4)
        body = bytes(size - MESSAGE.size)
        self.acknowledged = [0] * self.subscribers
        self.counted = [0] * self.subscribers
        publish = self.client.publish
        with anyio.fail_after(_TIMEOUT):
            started = time.perf_counter()
            for sequence in range(1, count + 1):
                while sequence - min(self.acknowledged[:subscribers]) > in_flight:
                    await self.changed.wait()
                value = 1 if sequence == count else every
                await publish(subject, MESSAGE.pack(DATA, sequence, value) + body)
            while min(self.acknowledged[:subscribers]) < count:
                await self.changed.wait()
            elapsed = time.perf_counter() - started
        if min(self.counted[:subscribers]) != count:
            raise RuntimeError(f"messages lost: subscribers counted {self.counted}, sent {count}")
        return elapsed

    async def latencies(self, size: int, samples: int) -> list[list[int]]:
        """One PROBE at a time, *samples* times: each one's latencies (ns) to every subscriber."""
        body = bytes(size - MESSAGE.size)
        self.probes.clear()
        with anyio.fail_after(_TIMEOUT):
            for sequence in range(1, samples + 1):
                message = MESSAGE.pack(PROBE, sequence, time.monotonic_ns()) + body
                await self.client.publish(f"{self.prefix}.all", message)
                while len(self.probes.get(sequence, ())) < self.subscribers:
                    await self.changed.wait()
        return [self.probes[sequence] for sequence in range(1, samples + 1)]


async def _rate(
    publisher: _Publisher,
    subscribers: Subscribers,
    server_pid: int | None,
    *,
    receivers: int,
    size: int,
    count: int,
    window: int,
) -> RawRate:
    server_cpu = 0.0 if server_pid is None else process_cpu_seconds(server_pid)
    subscriber_cpu = subscribers.cpu_seconds()
    publisher_cpu = time.process_time()
    elapsed = await publisher.rate(receivers, size, count, window)
    publisher_cpu = time.process_time() - publisher_cpu
    subscriber_cpu = subscribers.cpu_seconds() - subscriber_cpu
    if server_pid is not None:
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
    return RawRate(
        subscribers=receivers,
        size=size,
        messages_per_second=count / elapsed,
        publisher_cpu=publisher_cpu / count,
        # Only the receivers got messages; the others' CPU is their idle ticks.
        subscriber_cpu=subscriber_cpu / count / receivers,
        server_cpu=server_cpu / count,
    )


async def measure(
    url: str,
    *,
    subscribers: int = 10,
    size: int = 120_000,
    count: int = 1000,
    latency_size: int = 400,
    samples: int = 200,
    window: int = DEFAULT_WINDOW,
    server_pid: int | None = None,
) -> RawResults:
    """Measure raw nats-py through the NATS server at *url*.

    Args:
        url: the NATS server (``nats://host:port``).
        subscribers: subscriber processes (at least 1).
        size: bytes per message of the rate measurements (at least 17).
        count: messages each rate measurement sends.
        latency_size: bytes per message of the latency measurement (at least 17).
        samples: messages the latency measurement sends, one at a time.
        window: bytes the publisher may have unacknowledged by any subscriber.
        server_pid: the server's process id, to count its CPU time (0 if not given).

    Raises:
        ValueError: an argument is out of range (the message names it).
        RuntimeError: a subscriber did not start, or messages were lost.
    """
    for name, value, least in (
        ("subscribers", subscribers, 1),
        ("size", size, MESSAGE.size),
        ("latency_size", latency_size, MESSAGE.size),
        ("count", count, 1),
        ("samples", samples, 1),
        ("window", window, 1),
    ):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    prefix = f"raw.{os.getpid()}"
    processes = Subscribers(url, prefix, subscribers)
    client = Client()
    try:
        await client.connect(url, allow_reconnect=False, name="raw publisher")
        publisher = _Publisher(client, prefix, subscribers)
        await client.subscribe(f"{prefix}.answers", cb=publisher.on_answer)
        await client.flush()
        # A warm-up, so that connections, buffers and code paths are hot.
        await publisher.rate(subscribers, size, min(count, 50), window)
        arguments = {"size": size, "count": count, "window": window}
        rate_one = await _rate(publisher, processes, server_pid, receivers=1, **arguments)
        rate_all = await _rate(publisher, processes, server_pid, receivers=subscribers, **arguments)
        probes = await publisher.latencies(latency_size, samples)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        processes.stop()
    every = [latency / 1e9 for probe in probes for latency in probe]
    latency = RawLatency(
        subscribers=subscribers,
        size=latency_size,
        p50=statistics.median(every),
        p99=percentile(every, 0.99),
        slowest_p99=percentile([max(probe) / 1e9 for probe in probes], 0.99),
    )
    return RawResults(rate_one=rate_one, rate_all=rate_all, latency=latency)


def describe_rate(rate: RawRate) -> str:
    """A report line's detail for *rate*."""
    return (
        f"{rate.size:,} B messages, {rate.bytes_per_second / 2**20:,.0f} MiB/s each; "
        f"CPU/msg: sub {rate.subscriber_cpu * 1e6:,.1f} us, pub "
        f"{rate.publisher_cpu * 1e6:,.1f} us, nats-server {rate.server_cpu * 1e6:,.1f} us"
    )


async def _standalone(args: argparse.Namespace) -> None:
    from kds.testing import NatsServer

    with NatsServer() as server:
        results = await measure(
            server.url,
            subscribers=args.subscribers,
            size=args.size,
            count=args.count,
            latency_size=args.latency_size,
            samples=args.samples,
            window=args.window,
            server_pid=server.pid,
        )
    for rate in (results.rate_one, results.rate_all):
        print(
            f"rate to {rate.subscribers} subscriber(s): {rate.messages_per_second:,.0f} msg/s "
            f"({describe_rate(rate)})"
        )
    latency = results.latency
    print(
        f"latency to {latency.subscribers} subscribers, {latency.size} B: p50 "
        f"{latency.p50 * 1e3:.2f} ms, p99 {latency.p99 * 1e3:.2f} ms (slowest subscriber p99 "
        f"{latency.slowest_p99 * 1e3:.2f} ms)"
    )


def main() -> None:
    """Measure raw nats-py on a NATS server of its own, or be one subscriber (``--role``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--size", type=int, default=120_000, help="bytes per rate message")
    parser.add_argument("--count", type=int, default=1000, help="messages per rate measurement")
    parser.add_argument("--latency-size", type=int, default=400, help="bytes per latency message")
    parser.add_argument("--samples", type=int, default=200, help="latency messages")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="bytes in flight")
    parser.add_argument("--role", choices=["subscriber"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "subscriber":
        anyio.run(run_subscriber, args.url, args.prefix, args.index)
        return
    anyio.run(_standalone, args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
