"""Plan validation, schedules and per-step quotas."""
from __future__ import annotations

import numpy as np
import pytest

from thruput.data import DataError, MemorySource, Plan, constant, cosine, linear, piecewise
from thruput.data.mixture import quotas


def mem(name, weight=1.0, n=4):
    return MemorySource(name, [f"{name} {i}" for i in range(n)], weight=weight)


def test_schedules_values():
    assert constant(0.3)(10**6) == 0.3
    lin = linear(1.0, 0.0, steps=10, begin=5)
    assert [lin(s) for s in (0, 5, 10, 15, 99)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    cos = cosine(1.0, 0.0, steps=10)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    pw = piecewise({0: 1.0, 100: 0.0, 200: 2.0})
    assert [pw(s) for s in (0, 99, 100, 199, 200, 10**9)] == [1.0, 1.0, 0.0, 0.0, 2.0, 2.0]
    with pytest.raises(DataError, match="strictly increasing"):
        piecewise([(5, 1.0), (5, 2.0)])


@pytest.mark.parametrize("seq_len", [0, -4, 2.5])
def test_non_positive_seq_len(seq_len):
    with pytest.raises(DataError, match="seq_len must be a positive integer"):
        Plan([mem("a")], seq_len=seq_len, tokens_per_batch=64)


def test_plan_validation_errors():
    with pytest.raises(DataError, match="not a multiple of seq_len"):
        Plan([mem("a")], seq_len=16, tokens_per_batch=40)
    with pytest.raises(DataError, match="cannot be split equally over world_size 3"):
        Plan([mem("a")], seq_len=16, tokens_per_batch=64, world_size=3)
    with pytest.raises(DataError, match=r"duplicate source names \['a'\]"):
        Plan([mem("a"), mem("a")], seq_len=16, tokens_per_batch=64)
    with pytest.raises(DataError, match="source 'e' is empty"):
        Plan([mem("a"), MemorySource("e", [])], seq_len=16, tokens_per_batch=64)
    with pytest.raises(DataError, match="balance must be one of"):
        Plan([mem("a")], seq_len=16, tokens_per_batch=64, balance="kk")
    with pytest.raises(DataError, match=r"source 'a': weight at step 0 is -1.0"):
        Plan([mem("a", -1.0)], seq_len=16, tokens_per_batch=64)
    with pytest.raises(DataError, match=r"unknown sources \['zz'\]"):
        Plan([mem("a")], seq_len=16, tokens_per_batch=64, weights=lambda s: {"zz": 1.0})


def test_zero_sum_weights_at_construction_and_at_a_later_step():
    with pytest.raises(DataError, match=r"weights at step 0 sum to zero \(sources: a, b\)"):
        Plan([mem("a", 0.0), mem("b", 0.0)], seq_len=16, tokens_per_batch=64)
    plan = Plan([mem("a", piecewise({0: 1.0, 7: 0.0}))], seq_len=16, tokens_per_batch=64)
    plan.weights_at(6)
    with pytest.raises(DataError, match="weights at step 7 sum to zero"):
        plan.weights_at(7)


def test_quotas_exact_total_and_unbiased():
    w = np.array([0.5, 0.3, 0.2]) / 1.0
    total = 101
    q = np.stack([quotas(w, total, seed=1, step=s) for s in range(4000)])
    assert (q.sum(axis=1) == total).all()
    assert (q >= np.floor(w * total)).all() and (q <= np.floor(w * total) + 1).all()
    # Expected share is exact: the mean over 4000 steps is within 4 standard errors (each q_i
    # is floor + Bernoulli(frac), so sd <= 0.5 / sqrt(4000)).
    assert np.abs(q.mean(axis=0) - w * total).max() < 4 * 0.5 / np.sqrt(4000)
    assert quotas(w, total, 1, 7).tolist() == quotas(w, total, 1, 7).tolist()


def test_plan_quotas_units_follow_packing():
    plan = Plan([mem("a", 3.0), mem("b", 1.0)], seq_len=16, tokens_per_batch=128)
    assert plan.quotas(0).tolist() == [96, 32]
    rows = Plan([mem("a", 3.0), mem("b", 1.0)], seq_len=16, tokens_per_batch=128, packing=False)
    assert rows.quotas(0).tolist() == [6, 2]


def test_weights_callable_overrides_sources():
    plan = Plan([mem("a"), mem("b")], seq_len=8, tokens_per_batch=80, weights=lambda s: {"a": float(s < 3)} if s < 3 else {"b": 1.0})
    assert plan.quotas(2).tolist() == [80, 0]
    assert plan.quotas(3).tolist() == [0, 80]
