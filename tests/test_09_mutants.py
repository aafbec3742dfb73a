"""09_fast_samplers: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

The multistep solvers by hand on UNEQUAL steps in lambda = -log sigma: on equal steps (test_09's hand
checks) h_i / h_{i-1} = 1, so a ratio written upside down, or a divided difference over the wrong
interval, goes unnoticed; and on smooth schedules it changes the error only at higher order.
"""
import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def fs(load):
    return load("09_fast_samplers")


def gaussian(x, sigma):
    """D(x; sigma) = x / (1 + sigma^2): the exact denoiser of N(0, 1) data."""
    return x / (1 + sigma ** 2)


def run(fs, solver, sigmas, x0=3.0):
    x = getattr(fs, "sample_" + solver)(gaussian, torch.tensor([x0], dtype=torch.float64),
                                         torch.tensor(sigmas, dtype=torch.float64))
    return x.item()


def test_dpmpp_2m_on_unequal_steps(fs):
    """Lu et al. (2022), Algorithm 2 with r_i = h_{i-1} / h_i:
    D_hat = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1},
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - sigma_{i+1}/sigma_i) D_hat.
    sigmas 4 -> 2 -> 0.5: h_0 = ln 2, h_1 = ln 4, so r_1 = 1/2."""
    x0 = 3.0
    D0 = gaussian(x0, 4.0)
    x1 = 0.5 * x0 + 0.5 * D0                                   # first step: D_hat = D_0
    D1 = gaussian(x1, 2.0)
    r = math.log(2) / math.log(4)
    D_hat = (1 + 1 / (2 * r)) * D1 - 1 / (2 * r) * D0
    x2 = 0.25 * x1 + 0.75 * D_hat
    assert run(fs, "dpmpp_2m", [4.0, 2.0, 0.5]) == pytest.approx(x2, rel=1e-13)


def test_dpmpp_3m_on_unequal_steps(fs):
    """x_{i+1} = e^-h x_i + I_0 D_i + I_1 D' + I_2 D'' with I_0 = 1 - e^-h, I_1 = h - I_0, I_2 = h^2/2 - I_1, and
    D', D'' at lambda_i from the polynomial through the last outputs (a line on step 2, a parabola on step 3),
    fitted here by numpy. sigmas 8 -> 4 -> 1 -> 0.5: steps of ln 2, ln 4, ln 2 in lambda."""
    sigmas = [8.0, 4.0, 1.0, 0.5]
    lam = [-math.log(s) for s in sigmas]
    x, D = [3.0], []
    for i in range(3):
        D.append(gaussian(x[i], sigmas[i]))
        h = lam[i + 1] - lam[i]
        I_0 = 1 - math.exp(-h)
        I_1 = h - I_0
        I_2 = h * h / 2 - I_1
        poly = np.polyfit(lam[:i + 1], D, deg=i)               # degree 0, 1, 2 through 1, 2, 3 points
        d1 = np.polyval(np.polyder(poly, 1), lam[i]) if i >= 1 else 0.0
        d2 = np.polyval(np.polyder(poly, 2), lam[i]) if i >= 2 else 0.0
        x.append(math.exp(-h) * x[i] + I_0 * D[i] + I_1 * d1 + I_2 * d2)
    assert run(fs, "dpmpp_3m", sigmas[:3]) == pytest.approx(x[2], rel=1e-12)   # the 2nd-order warm-up step
    assert run(fs, "dpmpp_3m", sigmas) == pytest.approx(x[3], rel=1e-12)
