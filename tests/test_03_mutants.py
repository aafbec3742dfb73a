"""03_heun_and_schedules: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

The ablation sampler's churn (Algorithm 2, lines 4-6, in any sigma(t), s(t)) against a closed form.
"""
import math

import pytest
import torch

from test_03_heun_and_schedules import Counting


@pytest.fixture(scope="module")
def m(load):
    return load("03_heun_and_schedules")


def unit_gaussian(x, sigma, class_labels=None):
    """The exact denoiser of N(0, 1) data."""
    return x / (1 + sigma ** 2)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("schedule", ["vp", "ve", "linear"])
def test_churn_in_scaled_coordinates_matches_the_closed_form(m, schedule, solver):
    """For N(0, 1) data and s(t) = 1/sqrt(1 + sigma^2), x = s x~ is constant along the ODE whatever sigma(t):
    every Euler or Heun step is exact, x~ scales by sqrt((1 + sigma_next^2) / (1 + sigma_hat^2)). Churn with
    eps = 1 adds sqrt(sigma_hat^2 - sigma_i^2) S_noise to x~ at sigma_hat = (1 + gamma) sigma_i,
    gamma = min(S_churn / N, sqrt(2) - 1). So the whole run is known in closed form."""
    N, S_churn, S_noise = 6, 1.5, 1.3
    latents = torch.tensor([-1.5, 0.2, 0.9], dtype=torch.float64)
    out = m.make_sampler(num_steps=N, solver=solver, schedule=schedule, scaling="vp", S_churn=S_churn, S_noise=S_noise)(unit_gaussian, latents, randn_like=torch.ones_like)
    sigmas = [(80 ** (1 / 7) + i / (N - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(N)] + [0.0]
    gamma = min(S_churn / N, math.sqrt(2) - 1)
    x = latents * sigmas[0]                                                    # x~ at sigma_0
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        sigma_hat = (1 + gamma) * sigma
        x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * S_noise               # lines 5-6, in x~
        x = x * math.sqrt((1 + sigma_next ** 2) / (1 + sigma_hat ** 2))       # an exact step
    torch.testing.assert_close(out, x, rtol=1e-8, atol=0,
                               msg=lambda text: f"churn with schedule={schedule}, scaling=vp, {solver}\n{text}")


def test_churned_noise_levels_are_rounded_by_the_network(m):
    """With churn the sampler asks for sigma_hat = (1 + gamma) sigma_i: that too must be snapped by round_sigma."""
    grid = 0.01
    net = Counting(unit_gaussian, sigma_min=0.05, sigma_max=20.0,
                   round_sigma=lambda s: (torch.as_tensor(s) / grid).round() * grid)
    m.make_sampler(num_steps=12, S_churn=3)(net, torch.zeros(2, dtype=torch.float64))
    assert net.sigmas[0] == pytest.approx(20.0 * (1 + 3 / 12), rel=1e-12)
    off_grid = [s for s in net.sigmas if abs(s / grid - round(s / grid)) > 1e-9]
    assert not off_grid, f"noise levels not on the network's grid: {off_grid}"
