"""A writer killed with SIGKILL at an arbitrary point loses, splits and repeats no batch.

Defined for durable stores only (``durable_store_factory``): a MemoryStore does not
survive its process, so it has no parameter here.
"""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kds.testing import crash

pytestmark = [pytest.mark.anyio, pytest.mark.crash]


def _check_not_corrupt(spec):
    if spec.backend == "sqlite":
        connection = sqlite3.connect(spec.kwargs["path"])
        try:
            assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            connection.close()


# Each example starts several processes: run a fifth as many as the profile asks.
@settings(max_examples=max(2, settings().max_examples // 5))
@given(
    rounds=st.lists(
        st.tuples(st.integers(1, 25), st.sampled_from([0.0, 0.0, 0.001, 0.005, 0.02])),
        min_size=2,
        max_size=3,
    )
)
async def test_killed_writer_resumes_exactly_once(durable_store_factory, rounds):
    spec = await durable_store_factory.new_spec()
    cursor = 0
    for commits, delay in rounds:
        outcome = await crash.kill_child(spec, commits=commits, delay=delay)
        assert outcome.resumed == cursor, "the child must resume right after the stored cursor"
        _check_not_corrupt(spec)
        async with spec.create() as store:
            cursor = await crash.check_recovered(store, outcome)
