"""The data plan as a pure function: balance, coverage, determinism, mixing, val split (no I/O)."""

from collections import Counter

import pytest

from salnet.data.plan import TrainPlan, buffered_shuffle, rng_for, share, val_batch_count, val_batches


def planned_samples(plan: TrainPlan, epoch: int, rank: int) -> list[list[tuple[int, int]]]:
    """(shard, sample) of every batch of a rank, in batch order, as the plan lays it out."""
    batches = {}
    for reader in range(plan.readers):
        todo = plan.reader(epoch, rank, reader)
        stream = [(p.shard, i) for p in todo.pieces for i in range(p.start, p.stop)]
        emitted = [stream[pos] for pos in todo.order]
        assert sorted(todo.order) == list(range(len(stream))), "the emission order is a permutation of what is read"
        for k, batch in enumerate(todo.batches):
            batches[batch] = emitted[k * plan.batch_size : (k + 1) * plan.batch_size]
    assert sorted(batches) == list(range(plan.steps_per_epoch))
    return [batches[j] for j in range(plan.steps_per_epoch)]


SHAPES = [
    # (samples per shard, batch size, world size, readers per rank)
    ([10, 10, 10], 2, 4, 2),  # fewer shards than readers (3 < 8)
    ([10, 10, 10], 4, 1, 2),
    ([7, 3, 11, 5, 9], 3, 3, 2),  # uneven shards
    ([100], 8, 2, 4),  # one shard, eight readers
    ([5] * 16, 2, 2, 2),  # more shards than readers
    ([1, 1, 1], 1, 3, 1),
]


@pytest.mark.parametrize("sizes,batch,world,readers", SHAPES)
def test_every_rank_gets_the_same_steps_and_no_sample_twice(sizes, batch, world, readers):
    plan = TrainPlan([sizes], None, batch_size=batch, world_size=world, readers=readers, seed=3, shuffle_buffer=4)
    assert plan.steps_per_epoch == (sum(sizes) // world) // batch
    seen = Counter()
    for rank in range(world):
        batches = planned_samples(plan, epoch=0, rank=rank)
        assert len(batches) == plan.steps_per_epoch and all(len(b) == batch for b in batches)
        seen.update(s for b in batches for s in b)
    assert max(seen.values()) == 1, "a sample was planned twice in one epoch"
    assert sum(seen.values()) == sum(sizes) - plan.remainder
    assert 0 <= plan.remainder <= world * batch
    assert all(0 <= i < sizes[shard] for shard, i in seen)


@pytest.mark.parametrize(
    "sizes,batch,world,readers",
    [
        ([10], 4, 1, 1),  # one shard of 10, batch 4: samples 8 and 9 were never used
        ([10], 4, 1, 3),
        ([10], 3, 2, 2),
        ([7], 2, 3, 1),
        ([10, 3], 3, 3, 2),
        ([5, 5, 5], 4, 2, 2),
        ([100], 8, 2, 4),
    ],
)
def test_the_samples_an_epoch_leaves_out_change_with_the_epoch(sizes, batch, world, readers):
    plan = TrainPlan([sizes], None, batch_size=batch, world_size=world, readers=readers, seed=0, shuffle_buffer=4)
    every = {(shard, i) for shard, n in enumerate(sizes) for i in range(n)}
    epochs, used_in, left_out = 50, Counter(), set()
    for epoch in range(epochs):
        used = [s for rank in range(world) for b in planned_samples(plan, epoch, rank) for s in b]
        assert len(used) == len(set(used)) == len(every) - plan.remainder > 0
        used_in.update(used)
        left_out.add(frozenset(every - set(used)))
    assert len(left_out) > 1, "the remainder is drawn anew each epoch"
    assert set(used_in) == every, f"never used in {epochs} epochs: {sorted(every - set(used_in))}"
    # Each sample is left out of about remainder / N of the epochs, as a uniform draw would.
    share_used = 1 - plan.remainder / len(every)
    assert min(used_in.values()) > epochs * share_used / 2, sorted(used_in.items(), key=lambda kv: kv[1])[:3]


def test_the_order_is_a_pure_function_of_seed_and_epoch_and_changes_with_both():
    def order(seed, epoch):
        plan = TrainPlan([[8, 8, 8]], None, batch_size=2, world_size=2, readers=2, seed=seed, shuffle_buffer=5)
        return [planned_samples(plan, epoch, rank) for rank in range(2)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    # Each epoch still covers the same samples (only the order changes).
    assert sorted(s for r in order(0, 1) for b in r for s in b) == sorted(s for r in order(0, 0) for b in r for s in b)


def test_mixing_weights_repeat_or_subsample_each_set():
    # Set 0: 12 samples, set 1: 4 samples; weights 1:3 ask for 4 and 12 of the 16 per epoch.
    plan = TrainPlan([[6, 6], [2, 2]], [1.0, 3.0], batch_size=1, world_size=1, readers=1, seed=0, shuffle_buffer=1)
    assert plan.quotas == [4, 12] and plan.epoch_samples == 16
    drawn = Counter(s for b in planned_samples(plan, 0, 0) for s in b)
    set1 = {s: n for s, n in drawn.items() if s[0] >= 2}  # flat shard numbers 2 and 3 are set 1's
    assert sorted(set1.values()) == [3, 3, 3, 3], "set 1 is repeated three times, evenly"
    assert sum(n for s, n in drawn.items() if s[0] < 2) == 4 and max(drawn[s] for s in drawn if s[0] < 2) == 1


def test_shuffle_buffer_order_needs_at_most_buffer_samples_held():
    for n, buffer in [(50, 7), (10, 20), (33, 1)]:
        order = buffered_shuffle(n, buffer, rng_for(0, n))
        assert sorted(order) == list(range(n))
        # Emitting order[i] needs positions up to order[i] read: at most `buffer` read but not yet emitted.
        assert all(order[i] < i + buffer for i in range(n))
    assert buffered_shuffle(10, 1, rng_for(0)) == list(range(10)), "a buffer of one keeps the tar order"
    assert buffered_shuffle(40, 8, rng_for(1)) != list(range(40))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_val_batches_cover_every_sample_exactly_once(world):
    total, batch = 13, 3
    positions = []
    for rank in range(world):
        batches = val_batches(total, world, rank, batch)
        assert all(0 < hi - lo <= batch for lo, hi in batches)
        positions += [p for lo, hi in batches for p in range(lo, hi)]
        padded = val_batches(total, world, rank, batch, pad_to=val_batch_count(total, world, batch))
        assert len(padded) == val_batch_count(total, world, batch) and padded[: len(batches)] == batches
        assert all(b is None for b in padded[len(batches) :])
    assert sorted(positions) == list(range(total))


def test_shares_are_contiguous_balanced_and_cover_every_item_once():
    items = list(range(7))
    assert [items[share(7, 3, part)] for part in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [[1][share(1, 2, part)] for part in range(2)] == [[], [1]]
