"""01_toy_1d: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

Each test compares against a formula written out here: Eq. 5 (common.edm_sigma_steps, which 01 uses), the log-normal p_train of Table 1,
the inside of Eq. 2, and MLPDenoiser's documented input scaling.
"""
import math

import pytest
import torch

import common


@pytest.fixture(scope="module")
def toy(load):
    return load("01_toy_1d")


@pytest.mark.parametrize("N, sigma_min, sigma_max, rho", [(2, 0.002, 80.0, 7.0), (7, 0.002, 80.0, 7.0),
                                                          (18, 0.01, 20.0, 3.0), (256, 0.002, 80.0, 7.0)])
def test_edm_sigma_steps_are_eq5_then_zero(N, sigma_min, sigma_max, rho):
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N, then sigma_N = 0."""
    expected = [(sigma_max ** (1 / rho) + i / (N - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
                for i in range(N)] + [0.0]
    got = common.edm_sigma_steps(N, sigma_min, sigma_max, rho)
    assert got.dtype == torch.float64 and len(got) == N + 1
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0,
                               msg=lambda text: f"edm_sigma_steps({N}) is not Eq. 5 followed by 0\n{text}")
    assert got[0].item() == pytest.approx(sigma_max, rel=1e-12)
    assert got[N - 1].item() == pytest.approx(sigma_min, rel=1e-12)


@pytest.mark.parametrize("P_mean, P_std", [(-1.2, 1.2), (0.4, 2.0)])
def test_sample_sigma_is_log_normal(toy, P_mean, P_std):
    """ln(sigma) ~ N(P_mean, P_std^2): sample mean and std of ln(sigma) within 5 standard errors."""
    n = 200_000
    log_sigma = toy.sample_sigma(n, torch.Generator().manual_seed(0), P_mean=P_mean, P_std=P_std).log()
    assert log_sigma.shape == (n, 1)
    assert abs(log_sigma.mean().item() - P_mean) < 5 * P_std / math.sqrt(n), "mean of ln(sigma) is not P_mean"
    assert abs(log_sigma.std().item() - P_std) < 5 * P_std / math.sqrt(2 * n), "std of ln(sigma) is not P_std"


class Recording:
    """A denoiser that records its inputs and returns a fixed function of them."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.clone(), sigma))
        return 0.5 * x


def test_denoising_error_sees_y_plus_sigma_n(toy):
    """Eq. 2's integrand: D is evaluated at y + sigma n with noise level sigma, and the error is |D - y|^2."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(6, 1, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 2.5, 10.0, 80.0], dtype=torch.float64)[:, None]
    n = torch.randn(6, 1, generator=g, dtype=torch.float64)
    D = Recording()
    error = toy.denoising_error(D, y, sigma, n)
    (x, s), = D.calls
    torch.testing.assert_close(x, y + sigma * n, rtol=1e-15, atol=0, msg="D must see the noisy input y + sigma n")
    assert torch.equal(s, sigma)
    torch.testing.assert_close(error, (0.5 * (y + sigma * n) - y) ** 2, rtol=1e-15, atol=0)


def test_toy_loss_noise_has_the_drawn_sigma(toy):
    """toy_loss draws sigma from sample_sigma and unit noise: (x - y) / sigma ~ N(0, 1), ln sigma ~ N(-1.2, 1.2^2)."""
    torch.manual_seed(0)
    y = torch.randn(100_000, 1, dtype=torch.float64)
    D = Recording()
    toy.toy_loss(D, y)
    (x, sigma), = D.calls
    z = (x - y) / sigma
    n = len(y)
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert abs(sigma.log().mean().item() + 1.2) < 5 * 1.2 / math.sqrt(n)
    assert abs(sigma.log().std().item() - 1.2) < 5 * 1.2 / math.sqrt(2 * n)


def test_mlp_denoiser_input_scaling_and_noise_prediction(toy):
    """D(x; sigma) = x - sigma F(x / sqrt(1 + sigma^2), ln(sigma) / 4) (the class docstring), F seen through a probe."""
    class Probe(torch.nn.Module):
        def forward(self, features):
            seen.append(features)
            return features[..., :1] * 3 - features[..., 1:]

    model, seen = toy.MLPDenoiser(), []
    model.net = Probe()
    x = torch.tensor([-2.0, 0.3, 1.5, 40.0], dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0], dtype=torch.float64)
    with torch.no_grad():
        D = model(x, sigma)
    features = seen[0].double()
    torch.testing.assert_close(features[:, 0], x / (1 + sigma ** 2).sqrt(), rtol=1e-6, atol=0,
                               msg="the first feature must be x / sqrt(1 + sigma^2)")
    torch.testing.assert_close(features[:, 1], sigma.log() / 4, rtol=1e-6, atol=0)
    F = (seen[0][:, 0] * 3 - seen[0][:, 1]).double()                  # the probe's float32 output
    torch.testing.assert_close(D, x - sigma * F, rtol=1e-12, atol=1e-12)
