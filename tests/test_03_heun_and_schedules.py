"""03: Heun (Algorithm 1), the four discretizations, the ablation sampler, the finite-set denoiser."""
import itertools
import math

import pytest
import torch

import common

MU, S_DATA = 0.3, 0.5


def gaussian_denoiser(x, sigma, class_labels=None):
    return MU + S_DATA ** 2 / (S_DATA ** 2 + sigma ** 2) * (x - MU)


def exact_unscaled(x0, sigma0, sigma):
    return MU + (x0 - MU) * ((sigma ** 2 + S_DATA ** 2) / (sigma0 ** 2 + S_DATA ** 2)).sqrt()


class Counting:
    """Wraps a denoiser; counts calls and records the noise levels it is asked for."""

    def __init__(self, net, **attrs):
        self.net, self.sigmas = net, []
        self.__dict__.update(attrs)

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        return self.net(x, sigma)


@pytest.fixture(scope="module")
def m(load):
    return load("03_heun_and_schedules")


@pytest.fixture(scope="module")
def toy(load):
    return load("01_toy_1d")


def test_heun_is_second_order(m):
    """Halving the step cuts Heun's global error about 4x (every formulation), on a smooth problem."""
    ode = m.ch02
    x0 = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for f in (ode.VP(), ode.VE(), ode.EDM()):
        errors = []
        for n in (16, 32, 64):
            sigmas = torch.logspace(1, -1, n + 1, dtype=torch.float64)
            t = f.sigma_inv(sigmas)
            x = m.heun(gaussian_denoiser, f.s(t[0]) * x0, t, f) / f.s(t[-1])
            errors.append(float((x - exact_unscaled(x0, sigmas[0], sigmas[-1])).abs().max()))
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        assert all(3.5 < r < 4.5 for r in ratios), (f.name, errors)


def test_ablation_heun_vs_euler_order_on_the_edm_ode(m):
    """Global error at sigma = 0 on a Gaussian: Heun ~4x per halving of the step, Euler ~2x."""
    latents = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact = exact_unscaled(latents * 80, torch.tensor(80.0, dtype=torch.float64), torch.tensor(0.0))

    def error(n, **kwargs):
        return float((m.make_sampler(num_steps=n, **kwargs)(gaussian_denoiser, latents) - exact).abs().max())
    # The final Euler jump from sigma_min = 0.002 adds a fixed ~1e-5 error, far below these.
    heun = [error(n) for n in (32, 64, 128)]
    euler = [error(n, solver="euler") for n in (64, 128, 256)]
    midpoint = [error(n, alpha=0.5) for n in (8, 16, 32)]      # Appendix D.2 with alpha = 1/2
    assert all(3.5 < a / b < 4.5 for a, b in zip(heun, heun[1:])), heun
    assert all(1.8 < a / b < 2.2 for a, b in zip(euler, euler[1:])), euler
    assert all(a / b > 3.5 for a, b in zip(midpoint, midpoint[1:])), midpoint


def test_nfe_counts(m):
    for solver, nfe in (("heun", 2 * 18 - 1), ("euler", 18)):
        net = Counting(gaussian_denoiser)
        m.make_sampler(num_steps=18, solver=solver)(net, torch.zeros(3, dtype=torch.float64))
        assert len(net.sigmas) == nfe
        assert min(net.sigmas) > 0          # sigma = 0 is never evaluated
    net = Counting(gaussian_denoiser)
    t = common.edm_sigma_steps(10)
    m.heun(net, torch.zeros(3, dtype=torch.float64), t, m.ch02.EDM())
    assert len(net.sigmas) == 2 * 10 - 1


def test_edm_discretization_eq5(m):
    s = m.sigma_steps("edm", 18, 0.002, 80, 7)[:-1]
    assert math.isclose(s[0], 80, rel_tol=1e-12) and math.isclose(s[-1], 0.002, rel_tol=1e-12)
    roots = s ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[:1].expand(17), rtol=1e-10)   # uniform in sigma^(1/rho)
    assert torch.allclose(m.sigma_steps("edm", 5, 1.0, 5.0, rho=1)[:-1], torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64))


def test_vp_discretization(m):
    sigma_min, sigma_max = m.default_sigma_range("vp")
    assert math.isclose(sigma_max, math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel_tol=1e-12)
    beta_d, beta_min = m.vp_betas(sigma_min, sigma_max, 1e-3)
    assert math.isclose(beta_d, 19.9, rel_tol=1e-6) and math.isclose(beta_min, 0.1, rel_tol=1e-5)
    s = m.vp_sigma_steps(10, sigma_min, sigma_max)
    t = 1 + torch.arange(10, dtype=torch.float64) / 9 * (1e-3 - 1)           # uniform t from 1 to epsilon_s
    expected = torch.tensor([math.sqrt(math.exp(0.5 * 19.9 * v * v + 0.1 * v) - 1) for v in t.tolist()],
                            dtype=torch.float64)
    assert torch.allclose(s, expected, rtol=1e-5)


def test_ve_discretization_is_geometric(m):
    s = m.ve_sigma_steps(12, 0.02, 100)
    assert math.isclose(s[0], 100, rel_tol=1e-12) and math.isclose(s[-1], 0.02, rel_tol=1e-12)
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, (0.02 / 100) ** (1 / 11)), rtol=1e-10)


def test_iddpm_table(m):
    M, C_1, C_2 = 1000, 0.001, 0.008
    u = common.iddpm_noise_levels(M, C_1, C_2)
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2  # noqa: E731
    assert u[M] == 0 and torch.all(u.diff() < 0)
    # The recurrence: (u_{j-1}^2 + 1) / (u_j^2 + 1) = 1 / max(alpha_bar(j-1) / alpha_bar(j), C_1), for every j,
    # up to ~10 float32 ulps (the official code, and so ours, evaluates alpha_bar in float32).
    for j in range(1, M + 1):
        ratio = max(alpha_bar(j - 1) / alpha_bar(j), C_1)
        assert math.isclose((u[j - 1] ** 2 + 1) / (u[j] ** 2 + 1), 1 / ratio, rel_tol=1e-6), j


def table1_sigma_steps(discretization, N):
    """The noise levels sigma(t_i), i < N, written out from Table 1 with its default parameters.

    Independent of the code under test: plain Python floats, the u_j table by its recurrence in float64.
    """
    if discretization == "vp":      # t_i = 1 + i/(N-1) (eps_s - 1), sigma(t) = sqrt(e^(beta_d t^2/2 + beta_min t) - 1)
        t = [1 + i / (N - 1) * (1e-3 - 1) for i in range(N)]
        return [math.sqrt(math.exp(0.5 * 19.9 * v ** 2 + 0.1 * v) - 1) for v in t]
    if discretization == "ve":      # t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)), sigma(t) = sqrt(t)
        return [math.sqrt(100 ** 2 * (0.02 ** 2 / 100 ** 2) ** (i / (N - 1))) for i in range(N)]
    if discretization == "edm":     # Eq. 5 with sigma_min = 0.002, sigma_max = 80, rho = 7
        return [(80 ** (1 / 7) + i / (N - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(N)]
    # iDDPM: t_i = u_j with j = floor(j_0 + (M - 1 - j_0)/(N - 1) i + 1/2); u_M = 0,
    # u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar_{j-1} / alpha_bar_j, C_1) - 1), alpha_bar_j = sin^2(pi/2 j / (M (C_2 + 1))),
    # and j_0 = 8: the first entry at or below sigma_max = 81. The index is evaluated in floating point, as the
    # official code does (with exact fractions N = 59 would pick j = 504 instead of 503 at i = 29).
    M, C_1, C_2 = 1000, 0.001, 0.008
    alpha_bar = [math.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C_1) - 1)
    j_0 = 8
    assert u[j_0] <= 81 < u[j_0 - 1]
    return [u[math.floor(j_0 + (M - 1 - j_0) / (N - 1) * i + 0.5)] for i in range(N)]


@pytest.mark.parametrize("N", [2, 5, 18, 40, 59])
@pytest.mark.parametrize("discretization", ["vp", "ve", "iddpm", "edm"])
def test_every_discretization_matches_table1_step_by_step(m, discretization, N):
    """Each sigma_i of Table 1, and the sampler really evaluates the denoiser at exactly those levels.

    Tolerance: VP refits beta_d, beta_min from its sigma range (~1e-9 relative). iDDPM's alpha_bar is float32,
    as official, which moves u_j by up to 0.05 % (at u_999, where u^2 = 1/ratio - 1 cancels); neighbouring
    u_j differ by >= 0.31 %, so a 0.1 % tolerance still catches any index moved by one.
    """
    expected = torch.tensor(table1_sigma_steps(discretization, N), dtype=torch.float64)
    rtol = {"vp": 1e-8, "ve": 1e-12, "iddpm": 1e-3, "edm": 1e-12}[discretization]
    steps = m.sigma_steps(discretization, N)
    assert steps[-1] == 0
    steps = steps[:-1]
    torch.testing.assert_close(steps, expected, rtol=rtol, atol=0, msg=lambda text: f"{discretization}, N = {N}: "
                               f"sigma_i differ at i = {((steps - expected).abs() > rtol * expected).nonzero().flatten().tolist()}\n{text}")
    net = Counting(gaussian_denoiser)
    m.make_sampler(num_steps=N, solver="euler", discretization=discretization)(net, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(net.sigmas, dtype=torch.float64), expected, rtol=rtol, atol=0)


def test_every_combination_converges(m, toy, one_thread):
    """Each (solver, discretization, schedule, scaling) converges to the exact ODE solution on the 1-D toy.

    Reference: the same ODE from the same first noise level, 256 Heun steps of sigma(t) = t.
    Quadrupling the steps must cut the error more than 2x for Euler and 3x for Heun. (Asymptotically
    4x and 16x; Euler on VE-type schedules reaches its 4x only beyond ~256 steps, as 02's table shows.)
    """
    mix = toy.default_mixture()
    latents = torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    references, failures = {}, []
    for solver, disc, schedule, scaling in itertools.product(("euler", "heun"), ("vp", "ve", "iddpm", "edm"),
                                                             ("vp", "ve", "linear"), ("vp", "none")):
        sigma0 = float(m.sigma_steps(disc, 8)[0])
        if sigma0 not in references:
            references[sigma0] = m.make_sampler(num_steps=256, sigma_min=0.002, sigma_max=sigma0)(mix, latents)
        errors = [m.common.rms(m.make_sampler(num_steps=n, solver=solver, discretization=disc, schedule=schedule, scaling=scaling)(mix, latents), references[sigma0])
                  for n in ((32, 128) if solver == "heun" else (64, 256))]
        if not errors[1] < errors[0] / (3 if solver == "heun" else 2):
            failures.append((solver, disc, schedule, scaling, errors))
    assert not failures


def test_network_range_and_rounding_are_honoured(m):
    grid = 0.01
    net = Counting(gaussian_denoiser, sigma_min=0.05, sigma_max=20.0,
                   round_sigma=lambda s: (torch.as_tensor(s) / grid).round() * grid)
    m.make_sampler(num_steps=12)(net, torch.zeros(2, dtype=torch.float64))
    assert math.isclose(max(net.sigmas), 20.0, rel_tol=1e-12) and math.isclose(min(net.sigmas), 0.05, rel_tol=1e-9)
    assert all(abs(s / grid - round(s / grid)) < 1e-9 for s in net.sigmas)


def test_a_vp_schedule_is_refitted_to_the_networks_clamped_range(m, monkeypatch):
    """The official ablation sampler fits sigma(t) to run from sigma(epsilon_s) = sigma_min to sigma(1) = sigma_max
    after clamping both to the network's range, so t = 1 is the first step's noise level, not VP's default 152."""
    used = []
    original = m.ablation_sampler
    monkeypatch.setattr(m, "ablation_sampler", lambda net, x, sigmas, extra_args, randn_like, f, *a, **k:
                        used.append(f) or original(net, x, sigmas, extra_args, randn_like, f, *a, **k))
    net = Counting(gaussian_denoiser, sigma_min=0.05, sigma_max=20.0)
    m.make_sampler(num_steps=6, discretization="vp", schedule="vp", scaling="vp")(net, torch.zeros(2, dtype=torch.float64))
    sigma = lambda t: float(used[0].sigma(torch.tensor(t, dtype=torch.float64)))
    assert math.isclose(sigma(1e-3), 0.05, rel_tol=1e-9) and math.isclose(sigma(1.0), 20.0, rel_tol=1e-9)
    assert math.isclose(max(net.sigmas), 20.0, rel_tol=1e-9)


def test_ablation_sampler_lands_on_training_images(m):
    """The exact ODE of a finite set ends on training images; 18 Heun steps already get there."""
    g = torch.Generator().manual_seed(1)
    images = m.shape_images(32, resolution=8, generator=g)
    assert images.shape == (32, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    net = m.FiniteSetDenoiser(images)
    latents = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
    x = m.make_sampler()(net, latents)
    assert torch.allclose(x, images[net.nearest(x)], atol=1e-6)


def test_heun_step_weights_are_one_heun_step(m):
    """One Heun step of the EDM ODE is x_0/r + (1 - 1/r) D_0 + (r - 1)/2 (D_1 - D_0), r = sigma_0 / sigma_1."""
    g = torch.Generator().manual_seed(2)
    net = m.FiniteSetDenoiser(m.shape_images(16, resolution=4, generator=g))
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * 8
    for s0, s1 in ((80.0, 8.63), (8.0, 5.0)):
        D0 = net(x0, s0)
        D1 = net(x0 + (s1 - s0) * (x0 - D0) / s0, s1)           # D at the Euler prediction (Algorithm 1, line 5)
        w_ode, w_heun = m.heun_step_weights(s0 / s1)
        expected = x0 * s1 / s0 + w_ode * D0 + w_heun * (D1 - D0)
        x1 = m.heun(net, x0, torch.tensor([s0, s1], dtype=torch.float64), m.ch02.EDM())
        assert torch.allclose(x1, expected, rtol=1e-12, atol=1e-12)
    assert m.heun_step_weights(2.0) == (0.5, 0.5)             # Heun starts extrapolating at r = 2


@pytest.mark.parametrize("formulation, weight", [("EDM", lambda m, r: m.heun_step_weights(r)[1]),
                                                 ("VE", lambda m, r: m.heun_step_weight_ve(r))])
def test_heun_weight_on_the_change_of_d(m, formulation, weight):
    """With a denoiser that ignores x (D_0 at sigma_0, D_1 at sigma_1), x_1 is linear in D_1; its coefficient is
    Heun's weight on D_1 - D_0: (r - 1)/2 with sigma(t) = t, (r^2 - 1)/4 in VE's t = sigma^2."""
    f = getattr(m.ch02, formulation)()
    for s0, s1 in ((9.72, 0.47), (3.0, 2.0)):
        def step(d1):
            net = lambda x, sigma, labels=None: torch.full_like(x, 0.3 if float(sigma) == s0 else d1)  # noqa: E731
            t = f.sigma_inv(torch.tensor([s0, s1], dtype=torch.float64))
            return float(m.heun(net, torch.tensor([1.7], dtype=torch.float64), t, f))
        assert step(1.0) - step(0.0) == pytest.approx(weight(m, s0 / s1), rel=1e-9)


def test_heun_ahead_from(m):
    grid = {"heun, edm steps": [(7, 3.0), (15, 0.1), (31, 0.3)], "euler, edm steps": [(7, 0.3), (15, 0.2), (31, 0.2)],
            "heun, vp steps": [(7, 0.1), (15, 0.1), (31, 0.1)], "euler, vp steps": [(7, 0.2), (15, 0.2), (31, 0.2)]}
    assert m.heun_ahead_from(grid, ("vp",)) == 7
    assert m.heun_ahead_from(grid, ("edm", "vp")) is None
    grid["heun, edm steps"][2] = (31, 0.1)
    assert m.heun_ahead_from(grid, ("edm", "vp")) == 15


def test_demo_claims_heun_loses_on_the_toy_at_few_nfe(m, toy, one_thread):
    """The corrected toy claims, at reduced size (256 points): Heun loses to Euler at 7 NFE and wins at 63, because
    the long step 9.72 -> 0.47 of EDM's 4 steps extrapolates the toy's still-changing D; Euler does worst on EDM
    steps, which put the fewest steps where the toy's modes separate."""
    mix = toy.default_mixture()
    latents = torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    configs = {name: kwargs for name, kwargs in m.SOLVER_GRID.items() if kwargs["discretization"] in ("edm", "iddpm")}
    grid = {name: dict(points) for name, points in m.error_vs_nfe(mix, latents, configs, [4, 32]).items()}
    for disc in ("edm", "iddpm"):
        assert grid[f"heun, {disc} steps"][7] > 3 * grid[f"euler, {disc} steps"][7], grid
        assert grid[f"heun, {disc} steps"][63] < grid[f"euler, {disc} steps"][63] / 2, grid
    assert all(grid["euler, edm steps"][n] > grid["euler, iddpm steps"][n] for n in (7, 63)), grid
    sigmas = common.edm_sigma_steps(4)
    damage = m.heun_step_damage(mix, latents, sigmas, m.common.rms)
    assert damage[1] == max(damage) > 0.6 * grid["heun, edm steps"][7] > damage[0] + damage[2], damage


def test_demo_claims_ve_coordinates_hurt_heun_on_long_steps(m, one_thread):
    """On images at 15 NFE Heun with EDM's steps in VE's coordinates misplaces more samples than the original VE
    sampler and than Heun with sigma(t) = t (reduced size: 64 images, 32 latents)."""
    g = torch.Generator().manual_seed(0)
    net = m.FiniteSetDenoiser(m.shape_images(64, generator=g))
    latents = torch.randn(32, 3, 16, 16, generator=g, dtype=torch.float64)
    configs = {name: kwargs for name, kwargs in m.LADDER.items() if not name.startswith("VP")}
    ladder = {name: dict(points) for name, points in
              m.error_vs_nfe(net, latents, configs, [8], m.wrong_image_percent(net), reference_steps=128).items()}
    ve_heun = ladder["VE + heun & edm steps"][15]
    assert ve_heun > ladder["VE orig (euler, ve, ve/none)"][15] and ve_heun > ladder["EDM (heun, edm, linear/none)"][15]


def test_demo_claims_heun_vs_euler_on_images(m, one_thread):
    """The demo's conclusions on the image set, at reduced size (64 images, 32 latents)."""
    g = torch.Generator().manual_seed(0)
    net = m.FiniteSetDenoiser(m.shape_images(64, generator=g))
    latents = torch.randn(32, 3, 16, 16, generator=g, dtype=torch.float64)
    configs = {name: kwargs for name, kwargs in m.SOLVER_GRID.items() if kwargs["discretization"] in ("edm", "iddpm")}
    grid = {name: dict(points) for name, points in
            m.error_vs_nfe(net, latents, configs, [8, 16], m.wrong_image_percent(net), reference_steps=128).items()}
    # Heun beats Euler at equal NFE on EDM steps ...
    assert grid["heun, edm steps"][15] < grid["euler, edm steps"][15], grid
    assert grid["heun, edm steps"][15] + grid["heun, edm steps"][31] < \
        grid["euler, edm steps"][15] + grid["euler, edm steps"][31], grid
    # ... but not on iDDPM steps, because of the first step: r > 9, it alone does most of the damage,
    # and splitting it in two at least halves the damage.
    assert grid["heun, iddpm steps"][31] > grid["euler, iddpm steps"][31], grid
    study = m.first_step_study(net, latents, "iddpm", 16)
    assert study["sigma_0"] / study["sigma_1"] > 9, study
    assert study["first_step_only"] >= 0.8 * study["whole_run"] > 0, study
    assert study["first_step_split"] < study["whole_run"] / 2, study

def test_bad_command_lines_give_one_error_line(tmp_path, assert_one_line_errors):
    bad = [["--points", "0"], ["--images", "-1"], ["--latents", "x"], ["--bogus", "1"], ["--local", "3"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    assert_one_line_errors("03_heun_and_schedules.py", bad, tmp_path)


def test_unknown_solver_discretization_or_formulation_is_one_sentence(m, load):
    """A misspelt name must not fall through to some default (an unknown solver run as Euler, say): each of the
    ablation sampler's choices is refused by name where it is made."""
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown solver 'rk4'; choose euler or heun"):
        m.ablation_sampler(gaussian_denoiser, torch.zeros(1, 1, dtype=torch.float64), sigmas, solver="rk4")
    with pytest.raises(ValueError, match="unknown discretization 'cosine'; choose from vp, ve, iddpm, edm"):
        m.sigma_steps("cosine", 8)
    with pytest.raises(ValueError, match="solver is euler or heun and its discretization one of vp, ve, iddpm, edm, "
                                         "not rk4 and edm"):
        m.make_sampler(8, solver="rk4")
    with pytest.raises(ValueError, match="not heun and cosine"):
        m.make_sampler(8, discretization="cosine")
    for schedule, scaling in [("cosine", "none"), ("vp", "ve")]:
        with pytest.raises(ValueError, match=f"unknown schedule '{schedule}' or scaling '{scaling}'"):
            load("02_ode_sampler").formulation(schedule, scaling)
