"""The Transport contract, checked on every backend with kds.testing.transport_checks.

Backends are the factories of :mod:`tests.property.transport_conftest`. A check
that needs a way to break connections runs only on the factories that have one:
the sever check where ``sever`` is set (memory; NATS, by killing the server), the
killed-process check where ``open_peer_process`` is (gRPC and NATS, whose peer runs in a
child process).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds.testing import transport_checks as checks
from kds.testing.transport_checks import SIDES, TransportFactory
from tests.property.transport_conftest import FACTORIES, MAX_FRAME_SIZE

pytestmark = pytest.mark.anyio


def _ids(factory: TransportFactory) -> str:
    return factory.name


@pytest.fixture(scope="session", params=FACTORIES, ids=_ids)
def transport_factory(request: pytest.FixtureRequest) -> TransportFactory:
    """Every transport backend; each check opens its own listeners through it."""
    factory: TransportFactory = request.param
    return factory


@pytest.fixture(scope="session", params=[f for f in FACTORIES if f.sever is not None], ids=_ids)
def severable_transport_factory(request: pytest.FixtureRequest) -> TransportFactory:
    """The backends that can cut a session's connection inside the process."""
    factory: TransportFactory = request.param
    return factory


@pytest.fixture(
    scope="session", params=[f for f in FACTORIES if f.open_peer_process is not None], ids=_ids
)
def process_transport_factory(request: pytest.FixtureRequest) -> TransportFactory:
    """The backends whose peers run in other processes, which the checks can kill."""
    factory: TransportFactory = request.param
    return factory


# Frames are drawn as (size, seed) and made from those, so that a failing example
# reads as a short list of sizes rather than as megabytes of bytes. The position
# goes into the content too, so that frames drawn alike still differ and a swap shows.
FrameSpec = tuple[int, int]


def _frames(specs: list[FrameSpec]) -> list[bytes]:
    return [
        random.Random(f"{index}/{seed}").randbytes(size) for index, (size, seed) in enumerate(specs)
    ]


# Empty frames and frames exactly at the limit are the edges; small frames let a
# transport that batches them show how; any size up to the limit covers the rest.
frame_sizes = st.one_of(
    st.just(0),
    st.just(MAX_FRAME_SIZE),
    st.integers(0, 64),
    st.integers(0, MAX_FRAME_SIZE),
)
frame_specs = st.lists(st.tuples(frame_sizes, st.integers(0, 3)), max_size=30)
sides = st.sampled_from(SIDES)


@given(up=frame_specs, down=frame_specs)
async def test_frames_arrive_in_order_without_loss_in_both_directions(transport_factory, up, down):
    await checks.check_frames_arrive_in_order(transport_factory, _frames(up), _frames(down))


@given(side=sides, excess=st.one_of(st.just(1), st.integers(1, 2 * MAX_FRAME_SIZE)))
async def test_oversized_frame_is_refused_and_the_session_stays_usable(
    transport_factory, side, excess
):
    await checks.check_oversized_frame_is_refused(transport_factory, side, excess)


@given(closer=sides, before=frame_specs, reason=st.text(max_size=40))
async def test_close_delivers_the_frames_sent_before_it_then_the_reason(
    transport_factory, closer, before, reason
):
    await checks.check_close_delivers_frames_then_reason(
        transport_factory, closer, _frames(before), reason
    )


@pytest.mark.parametrize("closer", SIDES)
async def test_close_wakes_blocked_receives_and_sends(transport_factory, closer):
    await checks.check_close_wakes_blocked_calls(transport_factory, closer)


async def test_cancelled_receive_loses_no_frame(transport_factory):
    await checks.check_cancelled_receive_loses_no_frame(transport_factory, frames=300, seed=7)


async def test_concurrent_senders_keep_their_own_order(transport_factory):
    await checks.check_concurrent_senders_keep_their_order(transport_factory)


async def test_many_concurrent_sessions_stay_isolated(transport_factory):
    await checks.check_sessions_stay_isolated(transport_factory, sessions=20, frames=20)


async def test_serve_reports_a_dialable_address_and_a_stopped_listener_refuses(
    transport_factory,
):
    await checks.check_serve_and_connect(transport_factory)


@pytest.mark.parametrize("side", SIDES)
async def test_severed_session_ends_on_both_sides(severable_transport_factory, side):
    await checks.check_severed_session_is_detected(severable_transport_factory, side)


@pytest.mark.crash
@pytest.mark.parametrize("killed", SIDES)
async def test_killed_peer_process_is_detected_in_bounded_time(process_transport_factory, killed):
    await checks.check_killed_peer_process_is_detected(process_transport_factory, killed)
