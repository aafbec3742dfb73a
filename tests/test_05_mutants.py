"""05_preconditioning: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

p_train of Table 1 as a map from the loss's uniform / normal draw to sigma, checked at fixed draws
(including the ends of the range), so that a map with the right distribution but the wrong support
-- e.g. VP's t ~ U(0, 1 - eps_t) instead of U(eps_t, 1) -- is caught deterministically.
"""
import math

import pytest
import torch


@pytest.fixture(scope="module")
def ch05(load):
    return load("05_preconditioning")


DRAWS = [0.0, 0.25, 0.5, 1.0]


def drawn_sigmas(ch05, loss_fn, monkeypatch, draws):
    """The sigmas loss_fn picks when its torch.rand / torch.randn draw returns `draws`."""
    fixed = lambda shape, **kwargs: torch.tensor(draws, dtype=torch.float32)  # noqa: E731
    monkeypatch.setattr(torch, "rand", fixed)
    monkeypatch.setattr(torch, "randn", fixed)
    seen = []

    def net(x, sigma, labels=None, augment_labels=None):
        seen.append(sigma.flatten().double())
        return x
    loss_fn(net, torch.zeros(len(draws), 1))
    monkeypatch.undo()
    return seen[0]


def test_vp_loss_maps_u_to_t_from_1_down_to_epsilon_t(ch05, monkeypatch):
    """VP: t = 1 + u (epsilon_t - 1), sigma = sigma(t): u = 0 gives sigma(1), u = 1 gives sigma(epsilon_t).

    Compared as sigma^2 = e^g - 1: float32 resolves e^g only to its spacing near 1, 2^-23 (as official; see
    test_05's VP sigma_min), so that much absolute error in sigma^2 is allowed on top of float32's relative one."""
    got = drawn_sigmas(ch05, ch05.VPLoss(), monkeypatch, DRAWS) ** 2
    expected = torch.tensor([math.expm1(0.5 * 19.9 * t * t + 0.1 * t) for t in (1 + u * (1e-5 - 1) for u in DRAWS)],
                            dtype=torch.float64)
    assert torch.all((got - expected).abs() <= 2 ** -22 + 1e-6 * expected), \
        f"VPLoss sigma^2 for u = {DRAWS}: {got.tolist()}, expected {expected.tolist()}"


def test_ve_loss_maps_u_log_uniformly_onto_its_range(ch05, monkeypatch):
    """VE: ln sigma = ln sigma_min + u (ln sigma_max - ln sigma_min)."""
    got = drawn_sigmas(ch05, ch05.VELoss(), monkeypatch, DRAWS)
    expected = [math.exp(math.log(0.02) + u * (math.log(100) - math.log(0.02))) for u in DRAWS]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_edm_loss_maps_z_to_log_normal_sigma(ch05, monkeypatch):
    """EDM: ln sigma = P_mean + z P_std, with non-default P_mean, P_std so a swap of the two shows."""
    draws = [-1.0, 0.0, 0.5, 2.0]
    got = drawn_sigmas(ch05, ch05.EDMLoss(P_mean=0.4, P_std=1.5), monkeypatch, draws)
    expected = [math.exp(0.4 + z * 1.5) for z in draws]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_fm_loss_maps_z_to_log_normal_sigma_with_sd3s_defaults(ch05, monkeypatch):
    """FM: logit t = P_mean + z P_std, i.e. sigma = e^(P_mean + z P_std); SD3's P_mean = 0, P_std = 1 by default."""
    draws = [-1.0, 0.0, 0.5, 2.0]
    for loss_fn, (m, s) in [(ch05.FMLoss(), (0.0, 1.0)), (ch05.FMLoss(P_mean=0.4, P_std=1.5), (0.4, 1.5))]:
        got = drawn_sigmas(ch05, loss_fn, monkeypatch, draws)
        expected = [math.exp(m + z * s) for z in draws]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
