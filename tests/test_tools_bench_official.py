"""tools/bench_official.py (issue 29): the median's confidence interval it prints beside each paired ratio."""
import math
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_official
    return bench_official


@pytest.mark.parametrize("n, k", [(8, 1), (16, 4), (32, 10), (64, 24)])
def test_median_interval_is_the_binomial_order_statistics(tool, n, k):
    """[k-th smallest, k-th largest] for the largest k with P(Binomial(n, 1/2) <= k - 1) <= 2.5 %: k from the
    binomial tables (n = 16: P(<= 3) = 1.06 %, P(<= 4) = 3.84 %)."""
    values = random.Random(n).sample(range(1000), n)
    assert tool.median_interval(values) == (sorted(values)[k - 1], sorted(values)[n - k])
    tail = lambda j: sum(math.comb(n, i) for i in range(j + 1)) / 2 ** n
    assert tail(k - 1) <= 0.025 < tail(k)


def test_median_interval_covers_the_median_as_often_as_it_says(tool):
    """Over 4000 samples of 16 skewed values (log-normal, true median 1), the interval holds the true median at
    least 95 % of the time; its exact coverage is 1 - 2 P(Binomial(16, 1/2) <= 3) = 97.9 %."""
    rng = random.Random(0)
    hits = 0
    for _ in range(4000):
        low, high = tool.median_interval([math.exp(rng.gauss(0, 0.3)) for _ in range(16)])
        hits += low <= 1 <= high
    assert 0.965 <= hits / 4000 <= 0.99


def test_with_too_few_values_the_interval_is_the_range(tool):
    assert tool.median_interval([3.0, 1.0, 2.0, 5.0]) == (1.0, 5.0)
