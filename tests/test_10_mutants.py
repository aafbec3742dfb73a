"""10_guidance: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

The demo's scores (evaluate) on samples whose scores are known exactly: the reference itself, the
reference shrunk towards each class's centre (all distances scale by the factor), and a threshold placed
between known log-densities.
"""
import pytest
import torch


@pytest.fixture(scope="module")
def m(load):
    return load("10_guidance")


def test_evaluate_scores_known_cases(m):
    mix = m.spiral_mixture(num_classes=3, per_class=8, std=0.05)
    classes = torch.arange(3).repeat_interleave(40)
    reference = mix.sample(classes, torch.Generator().manual_seed(0))
    log_p = mix.log_density(reference, m.one_hot(classes, 3))
    k = 30                                              # threshold just above the k-th smallest log p
    threshold = log_p.sort().values[k - 1:k + 1].mean()
    same = m.evaluate(mix, reference, classes, reference, threshold)
    assert same["distance"] == pytest.approx(0, abs=1e-12) and same["diversity"] == pytest.approx(1, rel=1e-12)
    assert same["log_p"] == pytest.approx(float(log_p.mean()), rel=1e-12)
    assert same["off"] == pytest.approx(k / len(classes), abs=1e-12), "share of samples below the threshold"

    # Shrinking each class towards its centre by a: every pairwise distance within the class scales by a.
    a = 0.4
    shrunk = reference.clone()
    for c in range(3):
        centre = reference[classes == c].mean(0)
        shrunk[classes == c] = centre + a * (reference[classes == c] - centre)
    scores = m.evaluate(mix, shrunk, classes, reference, threshold)
    # (torch.cdist's |x|^2 + |y|^2 - 2 x.y path rounds to ~1e-11 here.)
    assert scores["diversity"] == pytest.approx(a, rel=1e-9), "diversity = mean pairwise distance / the data's"
    assert scores["distance"] > 0
