"""Mixed data streams: proportions, determinism, resuming mid-epoch, ranks."""

from collections import Counter

import pytest

import distillzoo as dz
from distillzoo.training.streams import MixedStreams, Stream


def letters(prefix, n):
    return [f"{prefix}{i}" for i in range(n)]


def first(n, mixer):
    return [mixer.streams[s].dataset[i] for (s, i), _ in zip(mixer, range(n))]


def test_repeat_counts_cover_every_example_the_stated_number_of_times():
    a, b, c = letters("a", 10), letters("b", 4), letters("c", 6)
    mixer = MixedStreams([Stream("a", a, repeat=1), Stream("b", b, repeat=2), Stream("c", c, repeat=0.5)], seed=3)
    assert mixer.counts == [10, 8, 3] and mixer.epoch_size == 21
    two_epochs = first(42, mixer)
    seen = Counter(two_epochs)
    assert all(seen[x] == 2 for x in a) and all(seen[x] == 4 for x in b)
    assert all(seen[x] == 1 for x in c)  # a fresh half of c in each epoch: all of it over two
    assert Counter(first(21, MixedStreams(mixer.streams, seed=3))) == Counter(two_epochs[:21])
    assert two_epochs[:21] != two_epochs[21:]


def test_weights_split_an_epoch_by_largest_remainders():
    mixer = MixedStreams([Stream("en", letters("e", 50), weight=0.7), Stream("zh", letters("z", 5), weight=0.3)],
                         seed=0, samples_per_epoch=33)
    assert mixer.counts == [23, 10]  # 23.1 and 9.9
    epoch = first(33, mixer)
    assert sum(x.startswith("z") for x in epoch) == 10
    assert Counter(x for x in epoch if x.startswith("z")) == Counter({f"z{i}": 2 for i in range(5)})


def test_the_order_depends_on_the_seed_only():
    streams = [Stream("a", letters("a", 30), repeat=1), Stream("b", letters("b", 20), repeat=1)]
    assert first(80, MixedStreams(streams, seed=1)) == first(80, MixedStreams(streams, seed=1))
    assert first(80, MixedStreams(streams, seed=1)) != first(80, MixedStreams(streams, seed=2))


@pytest.mark.parametrize("stop", [0, 7, 29, 50, 61])
def test_resuming_from_state_continues_the_uninterrupted_order(stop):
    streams = [Stream("a", letters("a", 17), repeat=1.5), Stream("b", letters("b", 9), repeat=1)]
    whole = first(90, MixedStreams(streams, seed=5))
    before = MixedStreams(streams, seed=5)
    head = before.take(stop) if stop else []
    state = before.state_dict()
    after = MixedStreams(streams, seed=5)
    after.load_state_dict(state)
    assert head + after.take(90 - stop) == whole


def test_ranks_split_each_global_order():
    streams = [Stream("a", letters("a", 11), repeat=1), Stream("b", letters("b", 8), repeat=1)]
    whole = first(40, MixedStreams(streams, seed=9))
    ranks = [MixedStreams(streams, seed=9, rank=r, world_size=2).take(20) for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == whole


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_holds_the_same_state_so_rank_0_s_checkpoint_resumes_all(world):
    """A checkpoint stores rank 0's state; each rank must continue from it as if never stopped."""
    streams = [Stream("a", letters("a", 13), repeat=1), Stream("b", letters("b", 6), repeat=1)]  # 19: odd epochs
    straight = [MixedStreams(streams, seed=4, rank=r, world_size=world) for r in range(world)]
    wanted = [[m.take(5) for _ in range(6)] for m in straight]
    ranks = [MixedStreams(streams, seed=4, rank=r, world_size=world) for r in range(world)]
    got = [[m.take(5) for _ in range(2)] for m in ranks]
    assert all(m.state_dict() == ranks[0].state_dict() for m in ranks)
    saved = ranks[0].state_dict()
    for r in range(world):
        resumed = MixedStreams(streams, seed=4, rank=r, world_size=world)
        resumed.load_state_dict(saved)
        got[r] += [resumed.take(5) for _ in range(4)]
    assert got == wanted
    everything = [x for step in zip(*wanted) for x in zip(*step)]  # interleave back into the global order
    assert [x for group in everything for x in group] == first(world * 30, MixedStreams(streams, seed=4))


@pytest.mark.parametrize("streams, message", [
    ([Stream("a", [1], repeat=1), Stream("b", [1], weight=1)], r"give every stream a repeat count or every stream a weight"),
    ([Stream("a", [], repeat=1)], r"data stream 'a' is empty"),
    ([Stream("a", [1], repeat=-1)], r"data stream 'a': repeat must be a finite number >= 0, got -1"),
    ([Stream("a", [1], repeat=1), Stream("a", [2], repeat=1)], r"stream names must be unique"),
    ([Stream("a", [1], weight=0)], r"the weights sum to 0"),
])
def test_bad_streams(streams, message):
    with pytest.raises(dz.ConfigError, match=message):
        MixedStreams(streams)


def test_a_state_from_other_streams_is_refused():
    state = MixedStreams([Stream("a", letters("a", 5), repeat=1)], seed=1).state_dict()
    with pytest.raises(dz.ConfigError, match=r"does not match this run's \(seed 1, counts \[6\]\)"):
        MixedStreams([Stream("a", letters("a", 6), repeat=1)], seed=1).load_state_dict(state)
