"""The tile-configuration cache: the fastest candidate per shape key, measured once."""

from __future__ import annotations

import pytest

from moefx.kernels.cuda.tuning import ConfigCache, TileConfig, matmul_candidates, outer_candidates, rows_bucket

CANDIDATES = (TileConfig(32, 64, 32), TileConfig(64, 128, 64, 8), TileConfig(128, 128, 64, 8))


class FakeClock:
    """Times each candidate by a fixed table, and runs its launch like the real measurement would."""

    def __init__(self, times: dict[TileConfig, float]) -> None:
        self.times, self.launched = times, []

    def launch(self, config: TileConfig) -> None:
        self.launched.append(config)

    def measure(self, run) -> float:
        before = len(self.launched)
        run()
        return self.times[self.launched[before]]


def test_the_fastest_candidate_is_chosen_once_per_key():
    clock = FakeClock({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    cache = ConfigCache(measure=clock.measure)
    assert cache.choose("a", CANDIDATES, clock.launch, timed=True) == CANDIDATES[1]
    assert clock.launched == list(CANDIDATES)  # each candidate ran once, under the clock
    assert cache.choose("a", CANDIDATES, clock.launch, timed=True) == CANDIDATES[1]
    assert len(clock.launched) == 3, "a known key is not measured again"
    clock.times[CANDIDATES[2]] = 0.5
    assert cache.choose("b", CANDIDATES, clock.launch, timed=True) == CANDIDATES[2]  # another shape, its own choice


def test_a_candidate_that_fails_is_passed_over_unless_all_fail():
    clock = FakeClock({CANDIDATES[0]: 3.0, CANDIDATES[2]: 2.0})  # CANDIDATES[1] has no time: it fails

    def measure(run):
        run()
        if clock.launched[-1] not in clock.times:
            raise RuntimeError("out of resources: shared memory")
        return clock.times[clock.launched[-1]]

    assert ConfigCache(measure=measure).choose("a", CANDIDATES, clock.launch, timed=True) == CANDIDATES[2]
    with pytest.raises(RuntimeError, match="out of resources"):
        ConfigCache(measure=measure).choose("b", CANDIDATES[1:2] * 2, clock.launch, timed=True)


def test_untimed_calls_take_the_first_candidate_and_cache_nothing():
    clock = FakeClock({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 2.0})
    cache = ConfigCache(measure=clock.measure)
    assert cache.choose("a", CANDIDATES, clock.launch, timed=False) == CANDIDATES[0]
    assert clock.launched == [] and cache.chosen == {}
    assert cache.choose("a", CANDIDATES, clock.launch, timed=True) == CANDIDATES[1]


@pytest.mark.parametrize("candidates", [matmul_candidates, outer_candidates])
@pytest.mark.parametrize("shape", [(64, 16, 8), (4096, 4096, 14336), (16384, 2048, 7168)])
def test_candidates_start_with_the_rule_of_thumb_and_do_not_repeat(candidates, shape):
    configs = candidates(*shape)
    assert len(set(configs)) == len(configs) >= 3
    small = shape[0] < 1024
    assert configs[0].BM == (32 if small else 64)


@pytest.mark.parametrize("rows,bucket", [(0, 1), (1, 1), (5, 8), (1024, 1024), (1025, 2048)])
def test_rows_round_up_to_a_power_of_two(rows, bucket):
    assert rows_bucket(rows) == bucket
