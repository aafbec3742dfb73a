"""01_toy_1d: the closed forms against independent computations, and the samplers against the data."""
import math

import pytest
import torch

import common

toy = common.load("01_toy_1d")


@pytest.fixture(scope="module")
def mix():
    return toy.default_mixture()


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_density_is_data_convolved_with_noise(mix, sigma):
    # Numerical convolution of p_data with N(0, sigma^2) on a fine grid.
    y = torch.linspace(-6, 6, 6001, dtype=torch.float64)
    p_data = mix.density(y, 0.0)
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 2.5], dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((x[:, None] - y) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    numeric = torch.trapezoid(p_data * kernel, y, dim=1)
    torch.testing.assert_close(mix.density(x, sigma), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_exact_denoiser_is_the_posterior_mean(mix, sigma):
    # Monte-Carlo E[y | x] = sum_i y_i N(x; y_i, sigma^2) / sum_i N(x; y_i, sigma^2), y_i ~ p_data.
    g = torch.Generator().manual_seed(0)
    y = mix.sample(400_000, g)[:, 0]
    x = torch.tensor([-1.5, -0.5, 0.0, 0.4, 1.2, 2.0], dtype=torch.float64)
    w = torch.exp(-0.5 * ((x[:, None] - y) / sigma) ** 2)
    w = w / w.sum(1, keepdim=True)
    mc = (w * y).sum(1)
    # Tolerance from the effective sample size: 5 standard errors of the weighted mean.
    ess = 1 / (w ** 2).sum(1)
    post_std = ((w * (y - mc[:, None]) ** 2).sum(1)).sqrt()
    assert ((mix.denoise(x, sigma) - mc).abs() < 5 * post_std / ess.sqrt()).all()


@pytest.mark.parametrize("sigma", [0.05, 0.5, 4.0])
def test_score_equals_autograd_and_tweedie(mix, sigma):
    x = torch.linspace(-3, 3, 41, dtype=torch.float64, requires_grad=True)
    (autograd,) = torch.autograd.grad(mix.log_density(x, sigma).sum(), x)
    x = x.detach()
    torch.testing.assert_close(mix.score(x, sigma), autograd, rtol=1e-9, atol=1e-9)
    # Eq. 3: score = (D(x; sigma) - x) / sigma^2
    torch.testing.assert_close((mix.denoise(x, sigma) - x) / sigma ** 2, autograd, rtol=1e-8, atol=1e-8)


def test_wasserstein1_closed_form():
    # W1 between a sample set and itself shifted by c is |c|.
    a = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert toy.wasserstein1(a, a + 0.3) == pytest.approx(0.3, abs=1e-9)
    assert toy.wasserstein1(torch.zeros(10), torch.ones(20)) == pytest.approx(1.0)


W1_BOUND = 0.03  # two independent data draws of 10k samples are ~0.006 apart


def _generated(sampler, mix, n=10_000, steps=256):
    g = torch.Generator().manual_seed(1)
    t = common.edm_sigma_steps(steps)
    x_T = torch.randn(n, 1, generator=g, dtype=torch.float64) * t[0]
    truth = mix.sample(n, g)
    return toy.wasserstein1(truth, sampler(x_T, t, g)[-1]), truth


def test_ode_and_sde_with_exact_denoiser_recover_the_mixture(mix):
    w_ode, _ = _generated(lambda x, t, g: toy.ode_sample(mix, x, t), mix)
    w_sde, _ = _generated(lambda x, t, g: toy.sde_sample(mix, x, t, g), mix)
    assert w_ode < W1_BOUND and w_sde < W1_BOUND


def test_bound_catches_a_wrong_sampler(mix):
    # The ODE's drift plus the SDE's noise (a common slip: forgetting the factor 2 of Eq. 6)
    # leaves the samples too wide; the same bound must reject it.
    def wrong_sde(x, t, g):
        for t_cur, t_next in zip(t[:-2], t[1:-1]):
            dt = t_cur - t_next
            x = x + dt / t_cur * (mix(x, t_cur) - x) + (2 * t_cur * dt).sqrt() * torch.randn(x.shape, generator=g,
                                                                                             dtype=x.dtype)
        return [mix(x, t[-2])]
    w_wrong, _ = _generated(wrong_sde, mix)
    assert w_wrong > 3 * W1_BOUND


def test_forward_paths_have_variance_sigma_squared(mix):
    g = torch.Generator().manual_seed(2)
    t = torch.linspace(0, 2, 21, dtype=torch.float64)
    y = torch.zeros(50_000, dtype=torch.float64)
    paths = toy.forward_paths(y, t, g)
    torch.testing.assert_close(paths.var(0), t ** 2, rtol=0.05, atol=1e-3)


def test_demo_claims_flow_lines_never_cross_and_exact_d_recovers_the_data(mix, one_thread):
    """The demo's conclusions at reduced size (10k samples; the learned MLP is tested below)."""
    t = torch.linspace(3, 0, 301, dtype=torch.float64)
    flow = toy.ode_sample(mix, torch.linspace(-3.5, 3.5, 29, dtype=torch.float64), t)
    assert torch.all(flow.diff(dim=1) > 0)          # deterministic flow lines keep their order: they never cross
    assert 15 <= int((flow[-1] > 0).sum()) <= 25     # and end in both modes, more of them in the heavier one
    g = torch.Generator().manual_seed(4)
    steps = common.edm_sigma_steps(256)
    truth = mix.sample(10_000, g)
    x_T = torch.randn(10_000, 1, generator=g, dtype=torch.float64) * steps[0]
    results = toy.generate({"exact": mix}, x_T, steps, seed=5)
    assert set(results) == {"ODE, exact D", "SDE, exact D"}
    for name, samples in results.items():
        assert toy.wasserstein1(truth, samples) < W1_BOUND, name
        assert abs(toy.mode_weight(samples) - 0.7) < 0.02, name


@pytest.fixture(scope="module")
def trained(mix):
    """The demo's MLP (its training budget and seed)."""
    return toy.train_mlp(mix, seed=0, log_every=0)


@pytest.mark.slow
def test_learned_mlp_beats_the_best_linear_denoiser(mix, trained):
    # The demo's training budget; evaluated where the ideal denoiser is far from linear.
    model = trained
    g = torch.Generator().manual_seed(3)
    y = mix.sample(60_000, g)
    n = torch.randn(y.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64).repeat(20_000)[:, None]
    mean, var = y.mean(), y.var()
    linear = lambda x, s: mean + var / (var + s ** 2) * (x - mean)  # noqa: E731  (Wiener filter)
    with torch.no_grad():
        exact = toy.denoising_error(mix, y, sigma, n).mean()
        excess_mlp = toy.denoising_error(model, y, sigma, n).mean() - exact
        excess_linear = toy.denoising_error(linear, y, sigma, n).mean() - exact
    assert excess_linear > 0.03  # the baseline is genuinely worse than the ideal denoiser
    assert excess_mlp < 0.2 * excess_linear


def test_training_log_shows_the_mean_since_the_last_line(mix, capsys, one_thread):
    """A single batch's loss scatters (the demo's 'rise' from 0.16 to 0.20 was one batch); the log prints means."""
    torch.manual_seed(0)
    _, history = toy.train_toy(toy.MLPDenoiser(), mix, toy.toy_loss, 12, 64, 3e-3, 0, log_every=5)
    lines = capsys.readouterr().out.splitlines()
    spans = [(0, 0), (1, 5), (6, 10), (11, 11)]
    assert len(lines) == len(spans)
    for line, (lo, hi) in zip(lines, spans):
        assert f"steps {lo:5d}-{hi:<5d}" in line
        assert float(line.split()[-1]) == pytest.approx(sum(history[lo:hi + 1]) / (hi - lo + 1), abs=5e-5)


@pytest.mark.slow
def test_demo_claims_the_learned_denoiser_sets_the_quality(mix, trained):
    """The demo's claims about the learned D, at reduced size (10k samples): its loss has levelled off just above
    the irreducible loss, yet its samples are many times further from the data than the exact D's with the same
    steps, and the SDE suffers more from the same errors than the ODE."""
    losses = toy.held_out_loss({"learned": trained, "exact": mix}, mix, 100_000, 2, "cpu")
    assert 0 < losses["learned"] - losses["exact"] < 0.03 * losses["exact"], losses
    g = torch.Generator().manual_seed(4)
    steps = common.edm_sigma_steps(256)
    truth = mix.sample(10_000, g)
    x_T = torch.randn(10_000, 1, generator=g, dtype=torch.float64) * steps[0]
    w1 = {name: toy.wasserstein1(truth, x) for name, x in
          toy.generate({"exact": mix, "learned": trained}, x_T, steps, seed=5).items()}
    for sampler in ("ODE", "SDE"):
        assert w1[f"{sampler}, learned D"] > 4 * w1[f"{sampler}, exact D"], w1
    assert w1["SDE, learned D"] > 1.2 * w1["ODE, learned D"], w1


def test_bad_command_lines_give_one_error_line(tmp_path, assert_one_line_errors):
    bad = [["--samples", "-5"], ["--steps", "0"], ["--steps", "abc"], ["--bogus"], ["--sam", "10"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    assert_one_line_errors("01_toy_1d.py", bad, tmp_path)
