"""Suite-wide settings: the event loop and the Hypothesis profiles."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Profiles: "dev" is the default and keeps CI inside its time budget; choose a larger
# one with KDS_HYPOTHESIS_PROFILE=ci or =nightly.
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "nightly", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("KDS_HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Every backend kds supports (aiosqlite, asyncpg, grpc.aio, nats-py) needs asyncio."""
    return "asyncio"
