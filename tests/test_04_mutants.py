"""04_stochastic_sampler: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

Algorithm 2's closed churn interval and its line 1, and the SDE baseline's noise-free last step.
"""
import math

import pytest
import torch

import common

from test_04_stochastic_sampler import Recording


@pytest.fixture(scope="module")
def m(load):
    return load("04_stochastic_sampler")


def gaussian(x, sigma, class_labels=None):
    return 0.3 + 0.25 / (0.25 + sigma ** 2) * (x - 0.3)


def test_churn_interval_is_closed(m):
    """Algorithm 2 churns where t_i is in [S_min, S_max], ends included: with S_min = t_{N-1} and S_max = t_0
    every step climbs to t_hat_i = (1 + gamma) t_i (the t_i as the sampler computes them, from a run without churn)."""
    N, S_churn = 6, 1.2
    plain = Recording(gaussian)
    m.make_sampler(num_steps=N)(plain, torch.zeros(1, dtype=torch.float64))
    t = [plain.calls[0][1]] + [s for _, s in plain.calls[1::2]]                   # t_0, t_1, ..., t_{N-1}
    assert len(t) == N
    churned = Recording(gaussian)
    m.make_sampler(num_steps=N, S_churn=S_churn, S_min=t[-1], S_max=t[0])(churned, torch.zeros(1, dtype=torch.float64), randn_like=torch.ones_like)
    t_hat = [s for _, s in churned.calls[0::2]]
    gamma = min(S_churn / N, math.sqrt(2) - 1)
    assert t_hat == pytest.approx([(1 + gamma) * v for v in t], rel=1e-12), "a step at an end of [S_min, S_max] " \
                                                                              "was not churned"


def test_first_state_is_latents_times_the_rounded_t0(m):
    """Line 1: x_0 = t_0 n with t_0 the first time step -- sigma_max after the network's round_sigma."""
    grid = 0.001
    net = Recording(gaussian, round_sigma=lambda s: (torch.as_tensor(s) / grid).round() * grid)
    latents = torch.tensor([0.3, -1.2], dtype=torch.float64)
    m.make_sampler(num_steps=5, sigma_max=80.0004)(net, latents)
    x0, t0 = net.calls[0]
    assert t0 == pytest.approx(80.0, rel=1e-12)                                   # snapped to the grid
    torch.testing.assert_close(x0, latents * 80.0, rtol=1e-15, atol=0, msg="x_0 must be latents * t_0")


@pytest.mark.parametrize("num_steps", [3, 10])
def test_sde_last_step_lands_on_the_denoiser(m, num_steps):
    """The last step into t = 0 is the plain ODE step x + (x - D)/t (0 - t) = D: no noise is added there."""
    net = Recording(gaussian)
    latents = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    sigmas = common.edm_sigma_steps(num_steps)
    out = m.sde_sampler(net, latents * sigmas[0], sigmas, randn_like=torch.ones_like)
    x_last, t_last = net.calls[-1]
    assert len(net.calls) == num_steps and t_last == pytest.approx(0.002, rel=1e-12)
    torch.testing.assert_close(out, gaussian(x_last, torch.tensor(t_last, dtype=torch.float64)), rtol=1e-12,
                               atol=1e-15, msg="the SDE's last step must land on D(x; t_{N-1})")
