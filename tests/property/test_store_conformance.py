"""The Store contract, checked on every backend with the checks of kds.testing.checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds.testing import checks
from kds.testing import strategies as kst

pytestmark = pytest.mark.anyio

setups = st.lists(kst.batches(), max_size=4)
safe_changes = st.lists(kst.changes(conditional=False), max_size=3)
writer_batches = st.lists(
    st.lists(kst.batches(min_size=1, max_size=3), min_size=1, max_size=4), min_size=1, max_size=3
)
fractions = st.floats(0, 1)


async def test_lifecycle(store_factory):
    await checks.check_lifecycle(store_factory)


async def test_commit_basics(store_factory):
    await checks.check_commit_basics(store_factory)


@given(
    setup=setups,
    prefix=safe_changes,
    suffix=safe_changes,
    stale_key=kst.resource_keys(),
    delete=st.booleans(),
    wrong=st.integers(0, 2),
)
async def test_stale_expected_version_conflicts_and_writes_nothing(
    store_factory, setup, prefix, suffix, stale_key, delete, wrong
):
    await checks.check_conflict_writes_nothing(
        store_factory, setup, prefix, stale_key, delete=delete, wrong=wrong, suffix=suffix
    )


@given(setup=setups, prefix=safe_changes, key=kst.resource_keys())
async def test_deleting_missing_key_raises_not_found_and_writes_nothing(
    store_factory, setup, prefix, key
):
    await checks.check_not_found_writes_nothing(store_factory, setup, prefix, key)


@given(
    setup=setups,
    valid=kst.batches(),
    invalid=kst.invalid_changes(),
    position=st.integers(0, 4),
)
async def test_invalid_change_raises_validation_error_and_writes_nothing(
    store_factory, setup, valid, invalid, position
):
    await checks.check_invalid_writes_nothing(store_factory, setup, valid, invalid, position)


@given(changes=safe_changes, case=kst.invalid_trackings())
async def test_invalid_tracking_raises_validation_error_and_writes_nothing(
    store_factory, changes, case
):
    tracking, field = case
    await checks.check_invalid_tracking_writes_nothing(store_factory, changes, tracking, field)


@given(
    setup=setups,
    writers=writer_batches,
    start=fractions,
    batch_size=st.integers(1, 5),
    use_cursor=st.booleans(),
)
async def test_follow_yields_every_event_once_in_order_under_concurrent_writers(
    store_factory, setup, writers, start, batch_size, use_cursor
):
    await checks.check_follow_concurrent(
        store_factory, setup, writers, start=start, batch_size=batch_size, use_cursor=use_cursor
    )


@given(batches=st.lists(kst.batches(min_size=1), max_size=6), through=fractions)
async def test_compaction_drops_history_only(store_factory, batches, through):
    await checks.check_compaction(store_factory, batches, through)


async def test_compaction_overtakes_slow_follower(store_factory):
    await checks.check_compaction_overtakes_follower(store_factory)


async def test_foreign_and_future_cursors_are_refused(store_factory):
    await checks.check_cursors(store_factory)


@given(
    setup=setups,
    labels=st.dictionaries(
        st.sampled_from(kst.LABEL_NAMES), st.sampled_from(kst.LABEL_VALUES), min_size=1, max_size=2
    ),
)
async def test_delete_labelled_removes_exactly_the_matches_in_one_commit(
    store_factory, setup, labels
):
    await checks.check_delete_labelled(store_factory, setup, labels)


async def test_tracking_rules(store_factory):
    await checks.check_tracking_basics(store_factory)


@given(
    steps=st.lists(
        st.tuples(st.lists(kst.changes(conditional=False), max_size=2), kst.wide_trackings()),
        min_size=1,
        max_size=8,
    )
)
async def test_tracking_cursor_moves_forward_with_its_changes(store_factory, steps):
    await checks.check_tracking(store_factory, steps)


@given(
    batches=setups,
    keys=st.lists(kst.resource_keys(), max_size=4),
    type_name=st.none() | st.sampled_from(kst.TYPES),
    mesh=st.none() | st.sampled_from(kst.MESHES),
    labels=kst.label_filters(),
    after=fractions,
    limit=st.integers(1, 4),
)
async def test_reads_agree(store_factory, batches, keys, type_name, mesh, labels, after, limit):
    await checks.check_reads(
        store_factory,
        batches,
        keys,
        type_name=type_name,
        mesh=mesh,
        labels=labels,
        after=after,
        limit=limit,
    )


@given(
    setup=setups,
    writers=writer_batches,
    types=st.none() | st.sets(st.sampled_from(kst.TYPES), max_size=2),
)
async def test_snapshot_matches_log_at_its_revision(store_factory, setup, writers, types):
    await checks.check_snapshot_consistency(store_factory, setup, writers, types)


@given(
    batches=setups,
    through=fractions,
    tracking=kst.trackings(),
)
async def test_durable_store_keeps_everything_across_reopen(
    durable_store_factory, batches, through, tracking
):
    await checks.check_reopen(durable_store_factory, batches, through, tracking)
