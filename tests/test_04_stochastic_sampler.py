"""04: Algorithm 2 line by line, its equality with the ablation sampler, per-seed determinism, the SDE."""
import math

import pytest
import torch

import common

MU, S_DATA = 0.3, 0.5


def gaussian_denoiser(x, sigma, class_labels=None):
    return MU + S_DATA ** 2 / (S_DATA ** 2 + sigma ** 2) * (x - MU)


class Recording:
    """Wraps a denoiser and records every (x, sigma) it is called with."""

    def __init__(self, net, **attrs):
        self.net, self.calls = net, []
        self.__dict__.update(attrs)

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.clone(), float(sigma)))
        return self.net(x, sigma)


@pytest.fixture(scope="module")
def m(load):
    return load("04_stochastic_sampler")


@pytest.fixture(scope="module")
def toy(load):
    return load("01_toy_1d")


def sde(m, net, latents, num_steps, **kwargs):
    """04's SDE sampler from unit latents on Eq. 5's num_steps noise levels (common.edm_sigma_steps)."""
    sigmas = common.edm_sigma_steps(num_steps)
    return m.sde_sampler(net, latents * sigmas[0], sigmas, **kwargs)


def seeded(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def test_algorithm2_noise_levels_and_churn(m):
    """The denoiser sees t_hat_i = (1 + gamma_i) t_i and t_{i+1}, gamma_i = min(S_churn/N, sqrt2 - 1) in [S_min, S_max]."""
    N, S_churn, S_min, S_max, S_noise = 8, 2.0, 0.1, 10.0, 1.5
    i = torch.arange(N, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / (N - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7      # Eq. 5, written out
    gamma = [S_churn / N if S_min <= v <= S_max else 0.0 for v in t.tolist()]
    net = Recording(gaussian_denoiser)
    latents = torch.tensor([0.7], dtype=torch.float64)
    m.make_sampler(num_steps=N, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)(net, latents, randn_like=torch.ones_like)
    expected = []
    for k in range(N):
        expected.append(float(t[k]) * (1 + gamma[k]))
        if k < N - 1:
            expected.append(float(t[k + 1]))
    assert [s for _, s in net.calls] == pytest.approx(expected, rel=1e-12)
    # States: with D = 0 every step is exact, x_{i+1} = x_hat_i t_{i+1} / t_hat_i, and with eps = 1
    # x_hat_i = x_i + sqrt(t_hat_i^2 - t_i^2) S_noise (lines 5-6), so the inputs are known in closed form.
    zero = Recording(lambda x, sigma: torch.zeros_like(x))
    out = m.make_sampler(num_steps=N, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)(zero, latents, randn_like=torch.ones_like)
    x = latents * t[0]                                                         # line 1
    for k in range(N):
        t_hat = t[k] * (1 + gamma[k])
        x_hat = x + (t_hat ** 2 - t[k] ** 2).sqrt() * S_noise
        assert torch.allclose(zero.calls[2 * k][0], x_hat, rtol=1e-12)
        x = x_hat * (t[k + 1] if k < N - 1 else 0) / t_hat
    assert torch.allclose(out, x) and out.dtype == torch.float64


def test_gamma_is_capped(m):
    net = Recording(gaussian_denoiser)
    m.make_sampler(num_steps=4, S_churn=100)(net, torch.zeros(1, dtype=torch.float64))
    t0 = 80.0
    assert net.calls[0][1] == pytest.approx(t0 * math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("kwargs", [dict(), dict(S_churn=30, S_min=0.05, S_max=50, S_noise=1.007),
                                    dict(num_steps=7, sigma_min=0.01, sigma_max=20, rho=3, S_churn=5)])
def test_ablation_sampler_equals_edm_sampler(m, toy, load, kwargs):
    """heun / edm / linear / none is Algorithm 2, to float64 precision, including the churn noise."""
    ablation = load("03_heun_and_schedules").make_sampler
    mix = toy.default_mixture()
    latents = torch.randn(64, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = m.make_sampler(**kwargs)(mix, latents, randn_like=seeded(5))
    b = ablation(solver="heun", discretization="edm", schedule="linear", scaling="none", **kwargs)(
        mix, latents, randn_like=seeded(5))
    assert a.dtype == b.dtype == torch.float64
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    if kwargs.get("S_churn"):   # the comparison is not vacuous: churn really uses the noise
        assert not torch.allclose(a, m.make_sampler(**kwargs)(mix, latents, randn_like=seeded(6)))


def test_per_seed_determinism_independent_of_batch(m, toy):
    mix = toy.default_mixture()
    seeds = [3, 1, 4, 1_000_003, 5, 9]

    def run(batch):
        rnd = common.StackedRandomGenerator("cpu", batch)
        latents = rnd.randn([len(batch), 1], dtype=torch.float64)
        return m.make_sampler(num_steps=10, S_churn=20)(mix, latents, randn_like=rnd.randn_like)
    together = run(seeds)
    apart = torch.cat([run(seeds[:2]), run(seeds[2:3]), run(seeds[3:])])
    assert torch.equal(together, apart)
    assert not torch.equal(together[0], together[1])


def test_network_range_and_rounding_are_honoured(m):
    grid = 0.01
    net = Recording(gaussian_denoiser, sigma_min=0.05, sigma_max=20.0,
                    round_sigma=lambda s: (torch.as_tensor(s) / grid).round() * grid)
    m.make_sampler(num_steps=12, S_churn=3)(net, torch.zeros(2, dtype=torch.float64))
    sigmas = [s for _, s in net.calls]
    assert max(sigmas) <= 20.0 * (1 + 3 / 12) + 1e-9 and sigmas[0] == pytest.approx(20.0 * 1.25, abs=grid)
    assert min(sigmas) >= 0.05 - 1e-12
    assert all(abs(s / grid - round(s / grid)) < 1e-9 for s in sigmas)


def test_exact_denoiser_recovers_the_mixture(m, toy, one_thread):
    """ODE, churn and SDE all sample the toy mixture (weights 0.3/0.7, stds 0.25) with its exact denoiser.

    Tolerances are ~4 standard deviations of the sampling noise of 20000 samples (the right-mode
    weight has std sqrt(0.21 / 20000) = 0.0032; W1 is dominated by it, times the distance 2 between modes).
    """
    mix = toy.default_mixture()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    truth = mix.sample(100000, g)
    runs = {
        "ODE": lambda: m.make_sampler(num_steps=64)(mix, latents),
        "churn": lambda: m.make_sampler(num_steps=64, S_churn=10)(mix, latents, randn_like=seeded(1)),
        "SDE": lambda: sde(m, mix, latents, 256, randn_like=seeded(1)),
    }
    for name, run in runs.items():
        x = run()
        w1, weight, std = toy.wasserstein1(x, truth), float((x > 0).double().mean()), float(x[x > 0].std())
        assert w1 < 0.03 and abs(weight - 0.7) < 0.013 and abs(std - 0.25) < 0.01, (name, w1, weight, std)


def test_sde_without_langevin_is_the_euler_ode(m, load):
    """beta = 0 removes the Langevin term of Eq. 6, leaving chapter 02's Euler method on the EDM ODE."""
    ode = load("02_ode_sampler")
    latents = torch.linspace(-2, 2, 5, dtype=torch.float64)
    x = sde(m, gaussian_denoiser, latents, 20, beta=lambda t: 0 * t)
    sigmas = common.edm_sigma_steps(20)
    assert torch.allclose(x, ode.euler_sampler(gaussian_denoiser, latents * sigmas[0], sigmas), rtol=1e-12)


def test_sde_step_moments(m):
    """One Euler-Maruyama step of Eq. 6 (beta = 1/t): mean x + 2 dt/t (x - D) ... checked with eps = 0 and eps = 1."""
    latents = torch.tensor([0.5], dtype=torch.float64)
    t0 = 80.0
    t1 = float((80 ** (1 / 7) + 1 / 2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)    # N = 3
    net = Recording(gaussian_denoiser)
    sde(m, net, latents, 3, randn_like=torch.zeros_like)
    x0 = latents * t0
    D = gaussian_denoiser(x0, torch.tensor(t0, dtype=torch.float64))
    mean = x0 + 2 * (t0 - t1) / t0 * (D - x0)
    assert torch.allclose(net.calls[1][0], mean, rtol=1e-12)
    net = Recording(gaussian_denoiser)
    sde(m, net, latents, 3, randn_like=torch.ones_like)
    assert torch.allclose(net.calls[1][0] - mean, torch.tensor([math.sqrt(2 * t0 * (t0 - t1))], dtype=torch.float64),
                          rtol=1e-12)


# ----------------------------------------------------------------------------
# The demo's claims, the command line.

def test_demo_claims_hold_at_reduced_size(m, one_thread):
    """The "What this shows" block, on 2048 samples and N = 24 (the demo: 8192 and 64)."""
    r = m.churn_sweep(samples=2048, steps=24, seed=0)
    at = lambda name, S_noise, S_churn: r["sweep"][(name, S_noise)][m.CHURNS.index(S_churn)]  # noqa: E731
    # The imperfect D: churn lowers W1 and re-widens the too narrow modes; S_noise > 1 lowers W1 further.
    assert at("imperfect D", 1.0, 0)[0] > at("imperfect D", 1.0, 10)[0] > at("imperfect D", 1.02, 10)[0]
    assert at("imperfect D", 1.0, 0)[2] < 0.2 < at("imperfect D", 1.0, 10)[2] < 0.25
    # The exact D: the ODE is within the noise floor of fresh data; S_noise > 1 at full churn widens the modes.
    assert at("exact D", 1.0, 0)[0] < r["floor"][2]
    assert abs(at("exact D", 1.0, 0)[2] - 0.25) < 0.01 and at("exact D", 1.02, 80)[2] > 0.26
    # Euler-Maruyama corrects the imperfect D too, but its steps widen the exact D's modes.
    assert r["sde"]["imperfect D"][0] < at("imperfect D", 1.0, 0)[0]
    assert r["sde"]["exact D"][2] > 0.26


def test_demo_writes_figures_and_conclusion(m, tmp_path, capsys, one_thread):
    m.main(["--samples", "256", "--steps", "4", "--device", "cpu", "--outdir", str(tmp_path)])
    assert {f.name for f in tmp_path.iterdir()} == {"w1_vs_churn.png", "histograms.png"}
    out = capsys.readouterr().out
    assert "What this shows" in out and "w1_vs_churn.png" in out and "histograms.png" in out


BAD_INPUTS = [["--samples", "1"], ["--eps", "-0.1"], ["--steps", "many"], ["--step", "8"], ["--frobnicate"]] + ([] if torch.cuda.is_available() else [["--device", "cuda"]])


def test_command_line_errors_are_one_line(tmp_path, assert_one_line_errors):
    """Each bad input: a non-zero exit, exactly one "error:" line, no traceback, nothing written."""
    assert_one_line_errors("04_stochastic_sampler.py", BAD_INPUTS, tmp_path, outdir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
