"""02: Table 1 formulations, the general ODE (Eq. 4 with D), Euler; checked against closed forms."""
import math

import pytest
import torch

import common

MU, S_DATA = 0.3, 0.5   # a single Gaussian N(MU, S_DATA^2): its ODE has a closed-form solution


def gaussian_denoiser(x, sigma, class_labels=None):
    """Exact D(x; sigma) for N(MU, S_DATA^2) data: the Wiener filter."""
    return MU + S_DATA ** 2 / (S_DATA ** 2 + sigma ** 2) * (x - MU)


def exact_unscaled(x0, sigma0, sigma):
    """x~(sigma) on the ODE trajectory through x~(sigma0) = x0: the deviation from MU scales with the marginal std."""
    return MU + (x0 - MU) * ((sigma ** 2 + S_DATA ** 2) / (sigma0 ** 2 + S_DATA ** 2)).sqrt()


@pytest.fixture(scope="module")
def ode(load):
    return load("02_ode_sampler")


def formulations(ode):
    return [ode.VP(), ode.VE(), ode.EDM(), ode.RF()]


def test_table1_closed_forms(ode):
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    vp, ve, edm, rf = formulations(ode)
    expected_vp = [math.sqrt(math.exp(0.5 * 19.9 * v ** 2 + 0.1 * v) - 1) for v in t.tolist()]
    assert torch.allclose(vp.sigma(t), torch.tensor(expected_vp, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(vp.s(t), 1 / (1 + vp.sigma(t) ** 2).sqrt(), rtol=1e-12)
    assert torch.allclose(ve.sigma(t), t.sqrt()) and torch.all(ve.s(t) == 1)
    assert torch.all(edm.sigma(t) == t) and torch.all(edm.s(t) == 1)
    t_rf = t[:-1]                                                # rectified flow: t in [0, 1), x = (1 - t) y + t n
    torch.testing.assert_close(rf.sigma(t_rf), t_rf / (1 - t_rf), rtol=1e-15, atol=0)
    torch.testing.assert_close(rf.s(t_rf), 1 - t_rf, rtol=1e-15, atol=0)
    torch.testing.assert_close(rf.s(t_rf) * rf.sigma(t_rf), t_rf, rtol=1e-15, atol=0)   # the noise's share of x is t
    for f in formulations(ode):
        ts = t_rf if f.name == "RF" else t
        assert torch.allclose(f.sigma_inv(f.sigma(ts)), ts, rtol=1e-10)


@pytest.mark.parametrize("schedule,scaling", [("vp", "vp"), ("ve", "none"), ("linear", "none"), ("linear", "vp"),
                                              ("ve", "vp"), ("vp", "none"), ("rf", "rf"), ("linear", "rf")])
def test_derivatives_match_autograd(ode, schedule, scaling):
    f = ode.formulation(schedule, scaling)
    t = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    d_sigma, = torch.autograd.grad(f.sigma(t).sum(), t)
    d_s, = torch.autograd.grad((f.s(t) + 0 * t).sum(), t)   # + 0 t: s = 1 has no graph of its own
    t = t.detach()
    assert torch.allclose(f.sigma_deriv(t), d_sigma, rtol=1e-10)
    assert torch.allclose(f.s_deriv(t) * torch.ones_like(t), d_s, rtol=1e-10, atol=1e-14)


def test_ode_derivative_is_the_exact_trajectory_slope(ode):
    """Eq. 4 with D in place of the score: dx/dt at x = s x~ must be the slope of s(t) x~(sigma(t))."""
    x0, sigma0 = torch.tensor([-1.7, 0.2, 2.5], dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    for f in formulations(ode):
        t = f.sigma_inv(torch.tensor([0.1, 1.0, 2.0], dtype=torch.float64)).requires_grad_(True)
        for k in range(3):
            x_t = f.s(t[k]) * exact_unscaled(x0[k], sigma0, f.sigma(t[k]))
            slope, = torch.autograd.grad(x_t, t)
            with torch.no_grad():
                d = ode.ode_derivative(gaussian_denoiser, x_t.detach(), t[k].detach(), f)
            assert torch.allclose(d, slope[k], rtol=1e-9), f.name


def test_rf_velocity_is_x_minus_D_over_t(ode, load):
    """Rectified flow's ODE is dx/dt = v = (x - D(x / s; sigma)) / t (Eq. 4 with sigma = t / (1 - t), s = 1 - t:
    sigma_dot / sigma + s_dot / s = 1 / t = sigma_dot s / sigma), to float64 rounding, for the toy's D."""
    mix, rf = load("01_toy_1d").default_mixture(), ode.RF()
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for t in (0.01, 0.3, 0.75, 0.99):
        t = torch.tensor(t, dtype=torch.float64)
        v = (x - mix(x / rf.s(t), rf.sigma(t))) / t
        torch.testing.assert_close(ode.ode_derivative(mix, x, t, rf), v, rtol=1e-13, atol=1e-13)


def test_rf_euler_steps_are_edm_euler_steps(ode, load):
    """One Euler step of rectified flow from x = s(t) x~ to t' is EDM's Euler step from x~ to sigma' times s(t'),
    for any D (here the toy's, far from constant): both steps are exact for a constant D and use D once,
    linearly (DDIM's step). Rounding only: a few ulps of the states, per step; whole samplers agree to N of them."""
    mix, rf, edm = load("01_toy_1d").default_mixture(), ode.RF(), ode.EDM()
    g = torch.Generator().manual_seed(0)
    eps = torch.finfo(torch.float64).eps
    for sigma, sigma_next in [(80.0, 40.0), (3.0, 0.5), (1.0, 0.9), (0.2, 0.0), (5.0, 0.0)]:
        sigmas = torch.tensor([sigma, sigma_next], dtype=torch.float64)
        x = sigma * torch.randn(256, 1, generator=g, dtype=torch.float64) + mix.sample(256, g)
        t = rf.sigma_inv(sigmas)
        step_rf = ode.euler(mix, x * rf.s(t[0]), t, rf) / rf.s(t[1])
        step_edm = ode.euler(mix, x, sigmas, edm)
        assert float((step_rf - step_edm).abs().max()) <= 16 * eps * float(x.abs().max()), (sigma, sigma_next)
    z = torch.randn(512, 1, generator=g, dtype=torch.float64)
    for n in (4, 32, 256):
        sigmas = common.edm_sigma_steps(n)
        a, b = ode.euler_sampler(mix, z * 80, sigmas, f=rf), ode.euler_sampler(mix, z * 80, sigmas, f=edm)
        assert float((a - b).abs().max()) <= 16 * n * eps * 80 * float(z.abs().max()), n


def test_euler_is_first_order(ode):
    """Halving the step roughly halves Euler's global error, for every formulation."""
    x0 = torch.linspace(-3, 3, 7, dtype=torch.float64)
    sigma0, sigma1 = 10.0, 0.1
    for f in formulations(ode):
        errors = []
        for n in (64, 128, 256):
            sigmas = torch.logspace(math.log10(sigma0), math.log10(sigma1), n + 1, dtype=torch.float64)
            t = f.sigma_inv(sigmas)
            x = ode.euler(gaussian_denoiser, f.s(t[0]) * x0, t, f) / f.s(t[-1])
            errors.append(float((x - exact_unscaled(x0, sigmas[0], sigmas[-1])).abs().max()))
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        assert all(1.8 < r < 2.2 for r in ratios), (f.name, errors)


def test_edm_tangent_points_at_the_denoiser(ode):
    """With sigma(t) = t, s = 1 one Euler step to t = 0 lands exactly on D(x; t); with VE only half way."""
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    sigma = torch.tensor(1.5, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    edm, ve, rf = ode.EDM(), ode.VE(), ode.RF()
    D = gaussian_denoiser(x, sigma)
    assert torch.allclose(ode.euler(gaussian_denoiser, x, torch.cat([sigma[None], zero]), edm), D, rtol=1e-12)
    t = rf.sigma_inv(sigma)
    assert torch.allclose(ode.euler(gaussian_denoiser, x * rf.s(t), torch.cat([t[None], zero]), rf), D, rtol=1e-12)
    x_ve = ode.euler(gaussian_denoiser, x, torch.cat([ve.sigma_inv(sigma)[None], zero]), ve)
    assert torch.allclose(x_ve, (x + D) / 2, rtol=1e-12)


def test_exact_denoiser_sampling_recovers_the_mixture(ode, load):
    toy = load("01_toy_1d")
    mix = toy.default_mixture()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2000, 1, generator=g, dtype=torch.float64)
    truth = mix.sample(20000, g)
    for f in (ode.VP(), ode.EDM()):
        sigmas = common.edm_sigma_steps(128)
        x = ode.euler_sampler(mix, latents * sigmas[0], sigmas, f=f)
        assert toy.wasserstein1(x, truth) < 0.04, f.name
        assert abs(float((x > 0).double().mean()) - 0.7) < 0.03, f.name


def test_exact_states_follow_the_closed_form_trajectory(ode, load):
    """The demo's 'exact' trajectory (Richardson-extrapolated Euler per interval) against the Gaussian closed form,
    on the demo's grid: within 1e-6, far below the local errors it measures (>= 1e-4 where they matter)."""
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64) * 80
    sigmas = common.edm_sigma_steps(32)
    states = ode.exact_states(gaussian_denoiser, x0, sigmas)
    for sigma, x in zip(sigmas, states):
        assert torch.allclose(x, exact_unscaled(x0, sigmas[0], sigma), rtol=0, atol=1e-6), float(sigma)

def test_finite_set_denoiser_is_the_posterior_mean(ode):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    net = ode.FiniteSetDenoiser(images)
    x = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    for sigma in (0.3, 1.0, 4.0):
        # Brute force: Gaussian likelihood of x under each image, normalised, then the weighted mean.
        lik = torch.stack([torch.exp(-((x - y) ** 2).sum((1, 2, 3)) / (2 * sigma ** 2)) for y in images], 1)
        w = lik / lik.sum(1, keepdim=True)
        expected = torch.einsum("bk,kchw->bchw", w, images)
        assert torch.allclose(net(x, torch.tensor(sigma, dtype=torch.float64)), expected, rtol=1e-10)
    near = images[[3, 1]] + 1e-3
    assert torch.allclose(net(near, torch.tensor(0.01, dtype=torch.float64)), images[[3, 1]], atol=1e-12)
    assert torch.equal(net.nearest(near), torch.tensor([3, 1]))

def test_demo_claims_images_favour_edm_coordinates_the_toy_favours_vp(ode, load, one_thread):
    """The demo's conclusions, at reduced size (64 images, 32 latents, 512 toy points)."""
    toy = load("01_toy_1d")
    vp, edm = ode.VP(), ode.EDM()
    g = torch.Generator().manual_seed(0)
    images = ode.shape_images(64, generator=g)
    net = ode.FiniteSetDenoiser(images)
    latents = torch.randn(32, *images.shape[1:], generator=g, dtype=torch.float64)

    # Images: EDM's coordinates give Euler fewer samples on the wrong image, at every step count.
    wrong = lambda x, ref: 100 * float((net.nearest(x) != net.nearest(ref)).double().mean())  # noqa: E731
    img = ode.euler_errors(net, latents, [8, 16, 32], [vp, edm], {"wrong": wrong},
                           reference_steps=512)
    assert all(e <= v for v, e in zip(img["VP"]["wrong"], img["EDM"]["wrong"])), img
    assert sum(img["EDM"]["wrong"]) < sum(img["VP"]["wrong"]), img

    # Curvature measured directly: below sigma = 0.5 (every latent has picked its image) EDM's steps are exact.
    sigmas = common.edm_sigma_steps(32)
    local = ode.local_euler_errors(net, latents[:8], sigmas, [vp, edm])
    low = [i for i, s in enumerate(sigmas[:-1].tolist()) if s < 0.5]
    assert max(local["EDM"][i] for i in low) < 1e-12 < 1e-5 < min(local["VP"][i] for i in low), local

    # The 1-D toy, the surprising case: VP's coordinates give the smaller error ...
    mix = toy.default_mixture()
    points = torch.randn(512, 1, generator=g, dtype=torch.float64)
    err = ode.euler_errors(mix, points, [16, 64, 256], [vp, edm], {"mean": ode.mean_abs_error},
                           reference_steps=1024)
    assert all(v < e for v, e in zip(err["VP"]["mean"], err["EDM"]["mean"])), err
    # ... as on Gaussian data, where VP's trajectories are constant (Euler exact) for unit variance.
    assert ode.gaussian_euler_error(1.0, 32, vp) < 1e-12
    assert ode.gaussian_euler_error(1.0, 32, edm) > 1e-2
    assert 2 * ode.gaussian_euler_error(0.5, 32, vp) < ode.gaussian_euler_error(0.5, 32, edm)

def test_demo_claims_edm_leads_on_images_except_at_4_steps_where_ve_does(ode, load, one_thread):
    """The corrected claim, at reduced size: EDM's coordinates misplace the fewest images from 8 steps on, but
    not at 4, where VE's Euler (whose step in t = sigma^2 moves x at most halfway to D) is ahead."""
    toy = load("01_toy_1d")
    g = torch.Generator().manual_seed(0)
    images = ode.shape_images(64, generator=g)
    net = ode.FiniteSetDenoiser(images)
    latents = torch.randn(32, *images.shape[1:], generator=g, dtype=torch.float64)
    wrong = lambda x, ref: 100 * float((net.nearest(x) != net.nearest(ref)).double().mean())  # noqa: E731
    img = ode.euler_errors(net, latents, [4, 8, 16], [ode.VP(), ode.VE(), ode.EDM()],
                           {"wrong": wrong}, reference_steps=512)
    assert img["VE"]["wrong"][0] < img["EDM"]["wrong"][0] < img["VP"]["wrong"][0], img
    assert ode.best_counts(img, "wrong") == {"VP": 0, "VE": 1, "EDM": 2}, img
    assert "EDM's coordinates give Euler\nthe smallest error at 2 of 3" in ode.lead_title("Images", img, "wrong")


def test_an_exception_to_edms_lead_is_a_step_count_where_another_formulation_is_strictly_better(ode):
    """The demo's claim 'EDM's coordinates put the fewest samples on another image at k of n step counts (not at
    ...)': a tie with EDM is no exception (best_counts counts a tie as a lead for each), so the exceptions are
    exactly the n - k step counts where EDM does not lead."""
    steps = [4, 8, 16, 32]
    err = {"VP": {"wrong": [5.0, 2.5, 0.0, 1.0]}, "VE": {"wrong": [1.5, 3.0, 0.0, 2.0]},
           "EDM": {"wrong": [2.5, 2.5, 0.0, 0.5]}}                # 4: VE better; 8: tied with VP; 16: all tied
    assert ode.lead_exceptions(steps, err, "wrong") == " (not at 4 steps: VP 5.0, VE 1.5, EDM 2.5 %)"
    assert ode.best_counts(err, "wrong")["EDM"] == len(steps) - 1
    tied = {name: {"wrong": [3.0, 0.0]} for name in err}
    assert ode.lead_exceptions([4, 8], tied, "wrong") == "" and ode.best_counts(tied, "wrong")["EDM"] == 2
    err["VP"]["wrong"][3] = 0.3                                   # and a second one, both listed in order
    assert ode.lead_exceptions(steps, err, "wrong") == \
        " (not at 4 steps: VP 5.0, VE 1.5, EDM 2.5 %; at 32 steps: VP 0.3, VE 2.0, EDM 0.5 %)"


def test_bad_command_lines_give_one_error_line(tmp_path, assert_one_line_errors):
    bad = [["--samples", "0"], ["--max-steps", "1.5"], ["--samples", "many"], ["--bogus"], ["--max", "8"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    assert_one_line_errors("02_ode_sampler.py", bad, tmp_path)
