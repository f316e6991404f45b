"""`thruput bench balance`: the peer planners are the algorithms they are named after."""
import numpy as np

from thruput.benchmarks.balance import karmarkar_karp, length_grouped_ranks, piece_costs, thruput_costs
from thruput.data import CostModel


def test_karmarkar_karp_two_way_textbook_case():
    # 8-7 -> 1; 6-5 -> 1; 4-1 -> 3; 3-1 -> 2: the differencing method ends 16 / 14 (optimum 15 / 15)
    costs = np.array([8.0, 7.0, 6.0, 5.0, 4.0])
    parts = karmarkar_karp(costs, 2)
    assert sorted(sorted(p) for p in parts) == [[0, 2], [1, 3, 4]]
    assert sorted(costs[p].sum() for p in parts) == [14.0, 16.0]


def test_karmarkar_karp_multi_way_is_a_partition_and_balances():
    rng = np.random.default_rng(1)
    costs = rng.lognormal(0, 1, 500)
    parts = karmarkar_karp(costs, 16)
    assert len(parts) == 16
    assert sorted(i for p in parts for i in p) == list(range(500))
    sums = np.array([costs[p].sum() for p in parts])
    assert sums.max() / sums.mean() < 1.001
    # three equal items per part: a perfect split
    ones = np.ones(48)
    assert {float(ones[p].sum()) for p in karmarkar_karp(ones, 16)} == {3.0}


def test_length_grouped_ranks_are_transformers_sampler_with_equal_counts():
    pieces = np.array([5, 90, 17, 3, 64, 64, 8, 41, 12, 1, 33])
    per_rank = length_grouped_ranks(pieces, 4, seed=0)
    assert [len(r) for r in per_rank] == [3, 3, 3, 3]  # 11 pieces: one repeated to make 12
    seen = [i for r in per_rank for i in r]
    assert set(seen) == set(range(11)) and len(seen) == 12


def test_thruput_planner_balances_and_karmarkar_karp_covers_the_same_pieces():
    cost = CostModel.for_transformer(256)
    rng = np.random.default_rng(2)
    pieces = rng.integers(1, 256, 400)
    ranks, rows, seq_len = 4, 64, 256
    pieces = np.concatenate([pieces, [1] * (ranks * rows * seq_len - int(pieces.sum()))])
    ours = thruput_costs(pieces, ranks, rows, seq_len, cost)
    assert ours.max() / ours.mean() < 1.01
    kk = karmarkar_karp(piece_costs(pieces, cost), ranks)
    assert sorted(i for p in kk for i in p) == list(range(len(pieces)))
