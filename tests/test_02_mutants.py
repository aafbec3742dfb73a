"""02_ode_sampler: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

The demo's two measuring instruments -- the extrapolated reference solution and the error of one
Euler step from the exact trajectory -- against Gaussian data, whose ODE is solved in closed form.
"""
import math

import pytest
import torch

import common


@pytest.fixture(scope="module")
def ode(load):
    return load("02_ode_sampler")


@pytest.fixture(scope="module")
def toy(load):
    return load("01_toy_1d")


def wiener(std, mu=0.0):
    """The exact denoiser of N(mu, std^2) data."""
    return lambda x, sigma, class_labels=None: mu + std ** 2 / (std ** 2 + sigma ** 2) * (x - mu)


def test_reference_solution_is_second_order(ode, toy):
    """2 x_{2N} - x_N cancels Euler's 1/N term: doubling N cuts the error ~4x (Euler alone: 2x).

    Exact endpoint for N(mu, s^2) data from x = 80 n: mu + (80 n - mu) s / sqrt(80^2 + s^2)."""
    mu, std = 0.3, 0.5
    latents = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact = mu + (80 * latents - mu) * std / math.sqrt(80 ** 2 + std ** 2)
    errors = [float((ode.reference_solution(wiener(std, mu), latents, n) - exact).abs().max())
              for n in (32, 64)]
    assert 3.5 < errors[0] / errors[1] < 4.5, f"reference error {errors} does not fall like 1/N^2"


@pytest.mark.parametrize("std", [0.5, 1.0])
def test_local_euler_errors_match_the_closed_form(ode, toy, std):
    """One Euler step from the exact state, for N(0, std^2) data (exact trajectory x~ proportional to
    sqrt(sigma^2 + std^2)). EDM: x~_0 (1 + (sigma_1 - sigma_0) sigma_0 / (std^2 + sigma_0^2)) against
    x~_0 sqrt((sigma_1^2 + std^2) / (sigma_0^2 + std^2)). VP with std = 1: x = s x~ is constant, so Euler
    is exact. (The exact states are good to ~1e-6, hence the absolute tolerance.)"""
    latents = torch.linspace(-2, 2, 9, dtype=torch.float64)
    sigmas = common.edm_sigma_steps(16)
    errors = ode.local_euler_errors(wiener(std), latents, sigmas, [ode.VP(), ode.EDM()])
    closed = []
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        x0 = latents * sigmas[0] * ((s0 ** 2 + std ** 2) / (sigmas[0] ** 2 + std ** 2)).sqrt()
        euler = x0 * (1 + (s1 - s0) * s0 / (std ** 2 + s0 ** 2))
        closed.append(float(((euler - x0 * ((s1 ** 2 + std ** 2) / (s0 ** 2 + std ** 2)).sqrt()) ** 2).mean().sqrt()))
    got = torch.tensor(errors["EDM"], dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(closed, dtype=torch.float64), rtol=1e-3, atol=1e-5,
                               msg=lambda text: f"EDM local errors\n{text}")
    if std == 1.0:
        assert max(errors["VP"]) < 1e-5, f"VP's Euler step is exact for unit-variance data, got {errors['VP']}"
