"""10: the guided denoiser (exactness at w = 1 and for a guide equal to the main model, the sigma
interval, per-seed determinism) and the exact class-conditional mixture it is demonstrated on."""
import argparse
import math

import numpy as np
import pytest
import torch

import common


@pytest.fixture(scope="module")
def m(load):
    return load("10_guidance")


@pytest.fixture(scope="module")
def sampler(load):
    """Algorithm 2 from unit latents, with the official call's options (04's make_sampler)."""
    make = load("04_stochastic_sampler").make_sampler
    return lambda net, latents, extra_args=None, randn_like=torch.randn_like, num_steps=18, **churn: \
        make(num_steps, **churn)(net, latents, extra_args, randn_like)


@pytest.fixture(scope="module")
def unet(load):
    return load("06_unet")


def small_mixture(m):
    """Seven components of different widths and weights in three classes."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(7, 2, generator=g, dtype=torch.float64) * 2 - 1
    stds = 0.05 + 0.25 * torch.rand(7, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(7, generator=g, dtype=torch.float64)
    return m.ClassMixture(means, stds, [0, 0, 1, 1, 1, 2, 2], weights)


def conditional_net(unet):
    """A small class-conditional EDM network (05 + 06) with random weights large enough that the class matters."""
    torch.manual_seed(0)
    net = unet.from_official_config("EDMPrecond", dict(
        img_resolution=8, img_channels=3, label_dim=4, model_channels=32, channel_mult=[1], num_blocks=1,
        attn_resolutions=[], dropout=0, model_type="SongUNet"))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net.eval().requires_grad_(False)


def generate(sampler, net, seeds, **kwargs):
    """Images for `seeds` as 08 generates them: latents, then a class, then churn noise, all per seed."""
    rnd = common.StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([len(seeds), 3, 8, 8])
    labels = torch.eye(4)[rnd.randint(4, size=[len(seeds)])]
    return sampler(net, latents, {"class_labels": labels}, randn_like=rnd.randn_like, num_steps=4, S_churn=5, **kwargs)


# ----------------------------------------------------------------------------
# The wrapper is exact where it must be.

def test_w1_and_identical_guide_give_exactly_the_unguided_images(m, sampler, unet, one_thread):
    net = conditional_net(unet)
    seeds = [0, 1, 2]
    unguided = generate(sampler, net, seeds)
    assert torch.equal(generate(sampler, m.guided(net, 1), seeds), unguided)                     # CFG, w = 1
    assert torch.equal(generate(sampler, m.guided(net, 1, guide_net=conditional_net(unet)), seeds), unguided)
    for w in (0, 1.5, 3, 7.25):                            # a guide that equals the main network, any w
        assert torch.equal(generate(sampler, m.guided(net, w, guide_net=conditional_net(unet)), seeds), unguided)
    # ... and the comparisons are not vacuous: CFG does change the images.
    assert (generate(sampler, m.guided(net, 3), seeds) - unguided).abs().max() > 1e-3


def test_cfg_guide_is_the_network_with_a_zero_class_vector(m, unet, one_thread):
    net = conditional_net(unet)
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 3.0]), torch.eye(4)[[1, 3]]
    D_c, D_u = net(x, sigma, labels), net(x, sigma, torch.zeros(2, 4))
    torch.testing.assert_close(m.guided(net, 2.5)(x, sigma, class_labels=labels), D_u + 2.5 * (D_c - D_u), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class labels"):
        m.guided(net, 2)(x, sigma)
    unconditional = m.ClassMixture([[0.0, 0.0]], 0.1, [0])
    unconditional.label_dim = 0
    with pytest.raises(ValueError, match="class-conditional"):
        m.guided(unconditional, 2)


class Recording:
    """A denoiser that records the sigmas it is called at."""

    def __init__(self, net):
        self.net, self.sigmas = net, []

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(sigma)
        return self.net(x, sigma, class_labels=class_labels)


def test_outside_the_interval_the_guide_is_not_called(m):
    mix = small_mixture(m)
    guide = Recording(mix.widened(2))
    D = m.GuidedDenoiser(mix, guide, w=3, interval=(0.1, 1.0))
    x, labels = torch.randn(4, 2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    for sigma in (0.05, 1.5, 80.0):
        sigma = torch.tensor(sigma, dtype=torch.float64)
        assert torch.equal(D(x, sigma, class_labels=labels), mix(x, sigma, labels))
    assert guide.sigmas == []
    for sigma in (0.1, 0.5, 1.0):                          # closed interval: both ends are inside
        sigma = torch.tensor(sigma, dtype=torch.float64)
        D_main, D_bad = mix(x, sigma, labels), mix.widened(2)(x, sigma, labels)
        assert torch.equal(D(x, sigma, class_labels=labels), D_main + 2 * (D_main - D_bad))
    # The guide sees the very sigma the main network sees (a python float stays one), and none at w = 1.
    guide.sigmas.clear()
    D_main, D_bad = mix(x, 0.3, labels), mix.widened(2)(x, 0.3, labels)
    assert torch.equal(D(x, 0.3, class_labels=labels), D_main + 2 * (D_main - D_bad)) and guide.sigmas == [0.3]
    m.GuidedDenoiser(mix, guide, w=1, interval=(0.1, 1.0))(x, 0.3, class_labels=labels)
    assert guide.sigmas == [0.3]
    # Per-sample noise levels straddling the interval: the rows outside are D_main exactly.
    sigma = torch.tensor([0.05, 0.5, 2.0, 1.0], dtype=torch.float64)
    out, D_main = D(x, sigma, class_labels=labels), mix(x, sigma, labels)
    assert torch.equal(out[[0, 2]], D_main[[0, 2]])
    assert not torch.equal(out[[1, 3]], D_main[[1, 3]])


def test_sampler_calls_the_guide_only_inside_the_interval(m, sampler):
    mix = small_mixture(m)
    guide, main = Recording(mix.widened(2)), Recording(mix)
    lo, hi = 0.2, 3.0
    labels = torch.eye(3, dtype=torch.float64)[[0, 2]]
    latents = torch.randn(2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = sampler(m.GuidedDenoiser(main, guide, 2, (lo, hi)), latents, {"class_labels": labels}, num_steps=12)
    inside = [float(s) for s in main.sigmas if lo <= s <= hi]
    assert [float(s) for s in guide.sigmas] == inside and 0 < len(inside) < len(main.sigmas)
    assert not torch.equal(out, sampler(mix, latents, {"class_labels": labels}, num_steps=12))       # guidance did act
    # With no sampler sigma inside the interval, the result is the unguided one, bit for bit.
    empty = sampler(m.GuidedDenoiser(mix, guide, 2, (81, 90)), latents, {"class_labels": labels}, num_steps=12)
    assert torch.equal(empty, sampler(mix, latents, {"class_labels": labels}, num_steps=12))


def test_fast_solvers_take_the_wrapper_as_denoise(m, sampler, load):
    """09's solvers call the guided denoiser as every sampler does: guided Heun there is 04's Algorithm 2, S_churn = 0."""
    fast = load("09_fast_samplers")
    mix = small_mixture(m)
    labels = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 1]]
    latents = torch.randn(4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for D in (m.guided(mix, 3), m.guided(mix, 2, guide_net=mix.widened(2), interval=(0.1, 1.0))):
        sigmas = fast.sigma_steps("edm", 8)
        out = fast.sample_heun(D, latents * sigmas[0], sigmas, {"class_labels": labels})
        torch.testing.assert_close(out, sampler(D, latents, {"class_labels": labels}, num_steps=8), rtol=1e-12, atol=1e-12)


def test_wrapper_shows_the_main_networks_sampler_attributes(m, unet):
    net = conditional_net(unet)
    net.sigma_min, net.sigma_max = 0.01, 50.0
    D = m.guided(net, 2)
    assert (D.sigma_min, D.sigma_max, D.img_resolution, D.img_channels, D.label_dim) == (0.01, 50.0, 8, 3, 4)
    assert D.round_sigma == net.round_sigma
    assert getattr(m.guided(small_mixture(m), 2), "sigma_min", "absent") == "absent"


def test_bad_settings_raise(m):
    mix = small_mixture(m)
    for w, interval in ((math.inf, None), (math.nan, None), (2, (1.0, 0.5)), (2, (-0.1, 1.0))):
        with pytest.raises(ValueError):
            m.GuidedDenoiser(mix, mix, w, interval)
    # --guidance-interval / --interval: common.number_list(float, 0) reads the numbers, 10's interval_of checks them.
    parse = lambda text: m.interval_of(common.number_list(float, 0)(text))
    assert parse("0.3,2.9") == (0.3, 2.9) and parse("0.5,0.5") == (0.5, 0.5)     # LO <= HI: LO = HI is allowed
    for text in ("0.3", "a,b", "2,1", "-1,1", "1,2,3"):
        with pytest.raises((ValueError, argparse.ArgumentTypeError)):
            parse(text)


def test_guided_generation_is_a_function_of_the_seed_only(m, sampler):
    """Batch 8 vs batch 3 under guidance, with churn noise drawn from each seed's own generator."""
    mix = small_mixture(m)
    seeds = [5, 0, 7, 1_000_003, 2, 9, 4, 11]

    def run(batch, D):
        rnd = common.StackedRandomGenerator("cpu", batch)
        latents = rnd.randn([len(batch), 2], dtype=torch.float64)
        labels = torch.eye(3, dtype=torch.float64)[rnd.randint(3, size=[len(batch)])]
        return sampler(D, latents, {"class_labels": labels}, randn_like=rnd.randn_like, num_steps=10, S_churn=20)

    for D in (m.guided(mix, 3), m.guided(mix, 2.5, guide_net=mix.widened(2), interval=(0.05, 2))):
        together = run(seeds, D)
        apart = torch.cat([run(seeds[:3], D), run(seeds[3:6], D), run(seeds[6:], D)])
        assert torch.equal(together, apart)
        assert not torch.equal(together, run(seeds, m.guided(mix, 1)))


# ----------------------------------------------------------------------------
# The exact mixture and the guided denoiser on it, against formulas written out here.

def closed_form_denoiser(mix, x, sigma, label):
    """D(x; sigma) = sum_k r_k (mu_k + s_k^2/(s_k^2 + sigma^2)(x - mu_k)) over the label's class (None: all)."""
    means, stds, weights, classes = (t.numpy() for t in (mix.means, mix.stds, mix.weights, mix.classes))
    out = np.zeros(2)
    ks = [k for k in range(len(means)) if label is None or classes[k] == label]
    var = {k: stds[k] ** 2 + sigma ** 2 for k in ks}
    log_terms = {k: math.log(weights[k]) - ((x - means[k]) ** 2).sum() / (2 * var[k]) - math.log(2 * math.pi * var[k])
                 for k in ks}
    top = max(log_terms.values())
    r = {k: math.exp(v - top) for k, v in log_terms.items()}
    total = sum(r.values())
    for k in ks:
        out += r[k] / total * (means[k] + stds[k] ** 2 / var[k] * (x - means[k]))
    return out


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0])
def test_guided_denoiser_equals_the_closed_form_on_the_mixture(m, sigma):
    mix = small_mixture(m)
    bad = mix.widened(2)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    classes = [0, 1, 2, 2, 1, 0]
    labels = torch.eye(3, dtype=torch.float64)[classes]
    w = 2.5
    cfg = m.guided(mix, w)(x, torch.tensor(sigma, dtype=torch.float64), class_labels=labels)
    auto = m.guided(mix, w, guide_net=bad)(x, torch.tensor(sigma, dtype=torch.float64), class_labels=labels)
    for i, c in enumerate(classes):
        xi = x[i].numpy()
        D_c, D_u = closed_form_denoiser(mix, xi, sigma, c), closed_form_denoiser(mix, xi, sigma, None)
        D_bad = closed_form_denoiser(bad, xi, sigma, c)
        np.testing.assert_allclose(cfg[i].numpy(), D_u + w * (D_c - D_u), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(auto[i].numpy(), D_bad + w * (D_c - D_bad), rtol=1e-11, atol=1e-12)


def test_zero_label_is_the_unconditional_mixture(m):
    mix = small_mixture(m)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(mix(x, 0.3, torch.zeros(5, 3, dtype=torch.float64)), mix(x, 0.3))
    np.testing.assert_allclose(mix(x, 0.3)[0].numpy(), closed_form_denoiser(mix, x[0].numpy(), 0.3, None),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label", [None, 1])
def test_denoiser_is_x_plus_sigma2_times_the_score(m, label):
    """Tweedie (Eq. 3): D(x; sigma) = x + sigma^2 grad_x log p(x; sigma), the gradient taken by autograd."""
    mix = small_mixture(m)
    labels = None if label is None else torch.eye(3, dtype=torch.float64)[[label] * 8]
    for sigma in (0.02, 0.4, 3.0):
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.2
        (score,) = torch.autograd.grad(mix.log_density(x.requires_grad_(), labels, sigma).sum(), x)
        torch.testing.assert_close(mix(x.detach(), sigma, labels), x.detach() + sigma ** 2 * score,
                                   rtol=1e-10, atol=1e-12)


def test_log_density_integrates_to_one_per_class(m):
    mix = small_mixture(m)
    grid = torch.linspace(-3, 3, 301, dtype=torch.float64)   # spacing 0.02, below 1/2 of the narrowest s_k
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([gx.flatten(), gy.flatten()], 1)
    cell = float(grid[1] - grid[0]) ** 2
    for label in (None, 0, 1, 2):
        labels = None if label is None else torch.eye(3, dtype=torch.float64)[[label] * len(points)]
        assert float(mix.log_density(points, labels).exp().sum()) * cell == pytest.approx(1, abs=1e-6)


def test_denoiser_is_the_posterior_mean_by_monte_carlo(m):
    """E[y | x] estimated from exact samples y of the class, weighted by N(x; y, sigma^2 I)."""
    mix = small_mixture(m)
    g = torch.Generator().manual_seed(3)
    y = mix.sample(torch.full([400_000], 1), g)
    sigma, x = 0.25, torch.tensor([[0.1, -0.2]], dtype=torch.float64)
    weights = torch.exp(-((y - x) ** 2).sum(1) / (2 * sigma ** 2))
    estimate = (weights[:, None] * y).sum(0) / weights.sum()
    # Standard error of a self-normalised estimate: sqrt(sum w^2 (y - estimate)^2) / sum w.
    stderr = (weights[:, None] ** 2 * (y - estimate) ** 2).sum(0).sqrt() / weights.sum()
    exact = mix(x, sigma, torch.eye(3, dtype=torch.float64)[[1]])[0]
    assert ((estimate - exact).abs() < 5 * stderr).all()
    assert (stderr < 0.01).all()


def test_samples_have_the_class_moments(m):
    """Each class's sample mean and covariance: sum_k pi_k mu_k / P(c) and
    sum_k pi_k (mu_k mu_k^T + s_k^2 I) / P(c) - mean mean^T (sums over the class's components)."""
    mix = small_mixture(m)
    n = 40000
    classes = torch.tensor([0, 1, 2]).repeat(n)
    y = mix.sample(classes, torch.Generator().manual_seed(4))
    for c in range(3):
        k = mix.classes == c
        pi = mix.weights[k] / mix.weights[k].sum()
        mean = (pi[:, None] * mix.means[k]).sum(0)
        second = (pi[:, None, None] * (mix.means[k, :, None] * mix.means[k, None, :]
                                       + mix.stds[k, None, None] ** 2 * torch.eye(2, dtype=torch.float64))).sum(0)
        cov = second - mean[:, None] * mean[None, :]
        ys = y[classes == c]
        centred = ys - ys.mean(0)
        products = centred[:, :, None] * centred[:, None, :]
        # Within 5 standard errors (estimated from the samples themselves).
        assert ((ys.mean(0) - mean).abs() < 5 * ys.std(0) / math.sqrt(n)).all()
        assert ((products.mean(0) - cov).abs() < 5 * products.std(0) / math.sqrt(n)).all()


# ----------------------------------------------------------------------------
# Metrics and the demo.

def test_energy_distance(m):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 2, generator=g, dtype=torch.float64)
    assert m.energy_distance(x, x) == pytest.approx(0, abs=1e-12)
    # Two point masses a distance d apart: 2d - 0 - 0.
    a, b = torch.zeros(4, 2, dtype=torch.float64), torch.full((5, 2), 3.0, dtype=torch.float64)
    assert m.energy_distance(a, b) == pytest.approx(2 * 3 * math.sqrt(2))
    assert m.energy_distance(x, x + 1) > m.energy_distance(x, x + 0.1) > 0


def test_demo_runs_and_names_its_figures(m, tmp_path, capsys, one_thread):
    m.main(["--samples", "10", "--steps", "4", "--outdir", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "What this shows" in out
    for name in ("samples.png", "samples_blurry_main.png", "metrics.png"):
        assert (tmp_path / name).stat().st_size > 0 and name in out


def test_demo_rejects_bad_options_in_one_line(m, capsys):
    with pytest.raises(SystemExit):
        m.main(["--samples", "0"])
    with pytest.raises(SystemExit) as exit_info:
        m.main(["--interval", "2,1", "--samples", "10", "--steps", "2"])
    assert str(exit_info.value).startswith("error: ")


def test_demo_claims_blurry_main_cfg_first_puts_samples_back_then_scatters_them(m, sampler, one_thread):
    """The demo's claim on the blurry main model, at reduced size (300 samples per class, 16 steps): CFG has fewer
    samples off the data at w = 1.5 than unguided, then more the harder it guides, more than unguided at w = 5;
    autoguidance at w = 3 leaves under a third of unguided's share off the data."""
    truth = m.spiral_mixture()
    main = truth.widened(m.BLURRY_MAIN)
    g = torch.Generator().manual_seed(0)
    classes = torch.arange(truth.label_dim).repeat_interleave(300)
    latents = torch.randn(len(classes), 2, generator=g, dtype=torch.float64)
    labels = m.one_hot(classes, truth.label_dim)
    data = truth.sample(classes, g)
    off_threshold = torch.quantile(truth.log_density(data, labels), 0.01)

    def off(denoiser):
        x = sampler(denoiser, latents, {"class_labels": labels}, num_steps=16)
        return float((truth.log_density(x, labels) < off_threshold).double().mean())
    cfg = {w: off(m.guided(main, w)) for w in (1, 1.5, 3, 5)}
    assert cfg[1.5] < cfg[1] < cfg[5] and cfg[1.5] < cfg[3] < cfg[5], cfg
    assert off(m.guided(main, 3, guide_net=main.widened(m.GUIDE_WIDENING))) < cfg[1] / 3


def test_the_guided_pair_answers_for_the_samplers_and_is_not_the_main_network(m):
    """Samplers read the noise range, round_sigma and the image shape of what they are given: the guided pair
    forwards exactly those to the main network. Anything else (its weights, init_config, training state) is not
    the pair's: asking for it is an AttributeError, so no code mistakes the pair for the main network."""
    class Net:
        sigma_min, sigma_max, img_resolution, img_channels, label_dim = 0.002, 80.0, 8, 3, 2
        init_config = {"class_name": "EDMPrecond"}

        def round_sigma(self, sigma):
            return sigma

    main, guide = Net(), Net()
    guide.sigma_max = 40.0
    D = m.GuidedDenoiser(main, guide, 2.0)
    assert {a: getattr(D, a) for a in m.GuidedDenoiser.SAMPLER_ATTRIBUTES if a != "round_sigma"} == dict(
        sigma_min=0.002, sigma_max=80.0, img_resolution=8, img_channels=3, label_dim=2)
    assert D.round_sigma.__self__ is main
    for name in ("init_config", "state_dict", "model"):
        with pytest.raises(AttributeError, match=f"'GuidedDenoiser' object has no attribute '{name}'"):
            getattr(D, name)
