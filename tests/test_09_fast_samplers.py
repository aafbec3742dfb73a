"""Tests for 09_fast_samplers: orders of convergence on an exact Gaussian-mixture denoiser,
each solver against its formula written out by hand, exact NFE counts, agreement with chapter
03's Euler/Heun, the step schedules against their formulas, and seed-only generation."""
import json
import math

import pytest
import torch

import common


@pytest.fixture(scope="module")
def fs(load):
    return load("09_fast_samplers")


def gaussian(x, sigma):
    """D(x; sigma) = x / (1 + sigma^2): the exact denoiser of N(0, 1) data -- simple enough to follow by hand."""
    return x / (1 + sigma ** 2)


def run(fs, solver, sigmas, x0=3.0, **options):
    """One scalar trajectory of `solver` on `gaussian`, with its counted NFE."""
    counter = common.CountingDenoiser(gaussian)
    x = getattr(fs, "sample_" + solver)(counter, torch.tensor([x0], dtype=torch.float64),
                                         torch.tensor(sigmas, dtype=torch.float64), **options)
    return x.item(), counter.evaluations


# ----------------------------------------------------------------------------
# Each solver equals its formula on a small case, with the numbers worked out by hand.

def test_euler_by_hand(fs):
    # sigmas 2 -> 1 -> 0 from x = 3. Step 1: D = 3/5, d = (3 - 0.6)/2 = 1.2, x = 3 - 1.2 = 1.8.
    # Step 2: D = 1.8/2 = 0.9, d = 0.9, x = 1.8 - 0.9 = 0.9.
    assert run(fs, "euler", [2.0, 1.0, 0.0]) == pytest.approx((0.9, 2), rel=1e-14)


def test_heun_by_hand(fs):
    # Step 1 (2 -> 1): d = 1.2, Euler guess 1.8, d' = (1.8 - 1.8/2)/1 = 0.9, x = 3 - (1.2 + 0.9)/2 = 1.95.
    # Step 2 (1 -> 0) is Euler: x = D(1.95; 1) = 0.975. NFE = 2 + 1.
    assert run(fs, "heun", [2.0, 1.0, 0.0]) == pytest.approx((0.975, 3), rel=1e-14)


def test_dpmpp_2m_by_hand(fs):
    # sigmas 4 -> 2 -> 1: both steps have h = log 2 and sigma_next / sigma = 1/2.
    # Step 1 (no history, D_hat = D = 3/17): x = 3/2 + (1/2)(3/17) = 27/17.
    # Step 2: D = (27/17)/5 = 27/85, D_hat = D + (D - 3/17) h / (2 h) = (3/2)(27/85) - (1/2)(15/85) = 33/85,
    #         x = (1/2)(27/17) + (1/2)(33/85) = 84/85.
    assert run(fs, "dpmpp_2m", [4.0, 2.0, 1.0]) == pytest.approx((84 / 85, 2), rel=1e-14)
    # Into sigma = 0 the last step is the denoiser output: D(27/17; 2) = 27/85.
    assert run(fs, "dpmpp_2m", [4.0, 2.0, 0.0]) == pytest.approx((27 / 85, 2), rel=1e-14)


def test_dpmpp_3m_by_hand(fs):
    # sigmas 8 -> 4 -> 2 -> 1: every step has h = log 2, e^-h = 1/2, and the Taylor weights
    # I_0 = 1/2, I_1 = h - 1/2, I_2 = h^2/2 - I_1. On equal steps the derivatives of D in lambda
    # are the textbook backward differences: D' = (3 D_2 - 4 D_1 + D_0) / (2h), D'' = (D_2 - 2 D_1 + D_0) / h^2.
    h = math.log(2)
    I_0, I_1 = 0.5, h - 0.5
    I_2 = h * h / 2 - I_1
    x0 = 3.0
    D0 = x0 / 65
    x1 = 0.5 * x0 + I_0 * D0                                               # order 1
    D1 = x1 / 17
    x2 = 0.5 * x1 + I_0 * D1 + I_1 * (D1 - D0) / h                         # order 2
    D2 = x2 / 5
    x3 = 0.5 * x2 + I_0 * D2 + I_1 * (3 * D2 - 4 * D1 + D0) / (2 * h) + I_2 * (D2 - 2 * D1 + D0) / h ** 2
    assert x1 == pytest.approx(99 / 65, rel=1e-15)                         # 3/2 + 3/130
    assert run(fs, "dpmpp_3m", [8.0, 4.0, 2.0, 1.0]) == pytest.approx((x3, 3), rel=1e-13)
    assert run(fs, "dpmpp_3m", [8.0, 4.0, 2.0, 0.0]) == pytest.approx((x2 / 5, 3), rel=1e-13)


def test_ipndm_by_hand(fs):
    # Unit steps 5 -> 4 -> 3 -> 2 -> 1, d_i = (x_i - D) / sigma_i = x_i sigma_i / (1 + sigma_i^2),
    # warm start Adams-Bashforth 1, 2, 3, then 4 (all steps have sigma_{i+1} - sigma_i = -1).
    d = lambda x, s: x * s / (1 + s * s)
    x0 = 3.0
    d0 = d(x0, 5)
    x1 = x0 - d0
    d1 = d(x1, 4)
    x2 = x1 - (3 * d1 - d0) / 2
    d2 = d(x2, 3)
    x3 = x2 - (23 * d2 - 16 * d1 + 5 * d0) / 12
    d3 = d(x3, 2)
    x4 = x3 - (55 * d3 - 59 * d2 + 37 * d1 - 9 * d0) / 24
    assert run(fs, "ipndm", [5.0, 4.0, 3.0, 2.0, 1.0]) == pytest.approx((x4, 4), rel=1e-14)
    # max_order=2 keeps using AB2 after the Euler step.
    x3_ab2 = x2 - (3 * d2 - d1) / 2
    assert run(fs, "ipndm", [5.0, 4.0, 3.0, 2.0], max_order=2) == pytest.approx((x3_ab2, 3), rel=1e-14)
    with pytest.raises(ValueError, match="max_order"):
        run(fs, "ipndm", [5.0, 4.0, 0.0], max_order=5)


# ----------------------------------------------------------------------------
# Orders of convergence on an exact Gaussian-mixture denoiser.

SIGMA_MAX, SIGMA_LO = 80.0, 0.1


@pytest.fixture(scope="module")
def mixture(load):
    """A smooth two-mode mixture (chapter 01's class), 64 starting points, and a converged RK4 reference.

    The ODE runs from sigma = 80 down to 0.1 (not into 0, whose last step is the same for every
    solver). The reference is classical RK4 on dx/dlambda = D - x (lambda = -log sigma) with 1000
    uniform steps; 2000 steps agree with it to 1e-10, far below the smallest error measured (4e-6)."""
    toy = load("01_toy_1d")
    mix = toy.GaussianMixture1D(weights=[0.3, 0.7], means=[-1.0, 1.0], stds=[0.5, 0.5])
    denoise = mix
    x0 = SIGMA_MAX * torch.linspace(-2.5, 2.5, 64, dtype=torch.float64)[:, None]
    lam = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_LO), 1001, dtype=torch.float64)
    f = lambda x, l: denoise(x, torch.exp(-l).reshape(1).expand(len(x))) - x
    x = x0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # 4000 tiny evaluations: threads would only contend
    for a, b in zip(lam[:-1], lam[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.set_num_threads(threads)
    return denoise, x0, x


def slopes(fs, mixture, sampler, grid, steps):
    """-d log(error) / d log(steps) between successive step counts."""
    denoise, x0, reference = mixture
    errors = [float((sampler(denoise, x0, grid(n)) - reference).pow(2).mean().sqrt()) for n in steps]
    return [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]


def rho_grid(fs, kind):
    return lambda n: fs.sigma_steps(kind, n + 1, SIGMA_LO, SIGMA_MAX)[:-1]   # n intervals ending at SIGMA_LO


def uniform_grid(n):
    return torch.linspace(SIGMA_MAX, SIGMA_LO, n + 1, dtype=torch.float64)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
@pytest.mark.parametrize("kind", ["edm", "logsnr"])
def test_order_low(fs, mixture, one_thread, solver, order, kind):
    # Measured slopes for 32 -> 64 -> 128 steps: euler 0.99 1.00, heun 2.05 2.02, 2m 2.00-2.04 (both kinds).
    s = slopes(fs, mixture, getattr(fs, "sample_" + solver), rho_grid(fs, kind), [32, 64, 128])
    assert s == pytest.approx([order, order], abs=0.1)


@pytest.mark.parametrize("kind", ["edm", "logsnr"])
def test_order_dpmpp_3m(fs, mixture, one_thread, kind):
    # Measured 32 -> 64 -> 128: 3.10, 3.02 (edm); 2.94, 2.95 (logsnr).
    s = slopes(fs, mixture, fs.sample_dpmpp_3m, rho_grid(fs, kind), [32, 64, 128])
    assert min(s) > 2.8


def published_3m(fs):
    """3M with the reference implementations' weight: phi_3 on D2 = (D1_0 - D1_1) / (r0 + r1) (module docstring)."""
    def sampler(denoise, x, sigmas):
        D_hist, lam = [], []
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            D = denoise(x, sigma.reshape(1).expand(len(x)))
            D_hist, lam = [D] + D_hist[:2], [-math.log(sigma)] + lam[:2]
            h = math.log(sigma / sigma_next)
            phi_1 = math.expm1(-h)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            x = (sigma_next / sigma) * x - phi_1 * D
            if len(D_hist) == 2:
                x = x + phi_2 * (D_hist[0] - D_hist[1]) / ((lam[0] - lam[1]) / h)
            elif len(D_hist) == 3:
                r0, r1 = (lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h
                D1_0, D1_1 = (D_hist[0] - D_hist[1]) / r0, (D_hist[1] - D_hist[2]) / r1
                x = x + phi_2 * (D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)) - phi_3 * (D1_0 - D1_1) / (r0 + r1)
        return x
    return sampler


def test_published_3m_weight_is_second_order(fs, mixture, one_thread):
    # The claim of the module docstring: with half the Taylor weight on D'' the slope falls to 2
    # (measured 64 -> 128: 1.88 on edm steps, 2.01 on logsnr), while ours stays at 3.
    for kind in ("edm", "logsnr"):
        assert slopes(fs, mixture, published_3m(fs), rho_grid(fs, kind), [64, 128])[0] < 2.3


def test_order_ipndm(fs, mixture, one_thread):
    # Adams-Bashforth 4 with its equal-step weights is 4th order on equal steps: measured slopes
    # 3.23, 3.95 for 256 -> 512 -> 1024 uniform steps in sigma (the ODE's curvature near sigma ~ 1
    # needs steps << 1 before the asymptotic range starts).
    s = slopes(fs, mixture, fs.sample_ipndm, uniform_grid, [256, 512, 1024])
    assert s[0] > 3.0 and s[1] > 3.5
    # On EDM's rho = 7 steps the step sizes vary and the fixed weights are exact only to 2nd
    # order: measured 2.07, 2.02 for 32 -> 64 -> 128 (module docstring).
    assert slopes(fs, mixture, fs.sample_ipndm, rho_grid(fs, "edm"), [32, 64, 128]) == pytest.approx([2, 2], abs=0.1)


# ----------------------------------------------------------------------------
# NFE, schedules, the registry.

@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp2m", "dpmpp3m", "ipndm"])
def test_nfe_is_counted_exactly(fs, solver):
    x0 = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    for nfe in (5, 7, 9, 11, 15, 35) if solver == "heun" else (2, 3, 5, 6, 8, 10, 12, 15, 20, 35):
        counter = common.CountingDenoiser(gaussian)
        fs.make_sampler(solver, nfe)(counter, x0)
        counted = counter.per_image(len(x0))
        assert counted == nfe
        # ... and the counter sees one call per evaluation of the schedule's steps.
        n = fs.steps_for_nfe(solver, nfe)
        assert len(fs.sigma_steps(fs.SOLVERS[solver].schedule, n)) == n + 1
        assert counted == (2 * n - 1 if solver == "heun" else n)


def test_steps_for_nfe(fs):
    assert fs.steps_for_nfe("heun", 35) == 18          # the paper's 18 steps = 35 NFE
    assert fs.steps_for_nfe("heun", 3) == 2
    assert fs.steps_for_nfe("ipndm", 10) == 10
    assert fs.steps_for_nfe("dpmpp3m", 2) == 2
    for solver, nfe in (("heun", 10), ("heun", 1), ("euler", 1), ("dpmpp2m", 0)):
        with pytest.raises(ValueError, match="NFE|budget"):
            fs.steps_for_nfe(solver, nfe)
    with pytest.raises(ValueError, match="unknown solver"):
        fs.steps_for_nfe("unipc", 10)


def test_registry(fs):
    assert set(fs.SOLVERS) == {"euler", "heun", "dpmpp2m", "dpmpp3m", "ipndm"}
    assert fs.SOLVERS["ipndm"] == (fs.sample_ipndm, "edm", 7.0)
    assert fs.SOLVERS["dpmpp3m"] == (fs.sample_dpmpp_3m, "logsnr", None)
    for method in fs.SOLVERS.values():
        fs.sigma_steps(method.schedule, 6, rho=method.rho)   # every default schedule is valid


def test_sigma_steps_edm_is_eq5(fs, load):
    for n, rho in ((2, 7.0), (18, 7.0), (10, 3.0)):
        assert torch.equal(fs.sigma_steps("edm", n, 0.002, 80.0, rho), common.edm_sigma_steps(n, 0.002, 80, rho))
        assert torch.equal(fs.sigma_steps("edm", n, 0.002, 80.0, rho),
                           load("03_heun_and_schedules").sigma_steps("edm", n, 0.002, 80, rho))


def test_sigma_steps_logsnr(fs):
    s = fs.sigma_steps("logsnr", 11, 0.002, 80.0)
    assert len(s) == 12 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0, rel=1e-14) and s[-2].item() == pytest.approx(0.002, rel=1e-14)
    steps = s[:-2].log() - s[1:-1].log()
    assert torch.allclose(steps, torch.full_like(steps, math.log(80 / 0.002) / 10), rtol=1e-12)


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_sigma_steps_time_uniform(fs, load, rho):
    # Mapped back to VP's time t with chapter 02/03's schedule fitted to [sigma_min, sigma_max],
    # t^(1/rho) must be uniform from 1 to epsilon_s^(1/rho) (rho = 1: DPM-Solver's time_uniform).
    ch02, ch03 = load("02_ode_sampler"), load("03_heun_and_schedules")
    _, _, sigma_inv = ch02.vp_schedule(*ch03.vp_betas(0.002, 80.0, 1e-3))
    s = fs.sigma_steps("time_uniform", 9, 0.002, 80.0, rho)
    assert len(s) == 10 and s[-1] == 0
    t = sigma_inv(s[:-1])
    expected = torch.linspace(1.0, 1e-3 ** (1 / rho), 9, dtype=torch.float64)
    assert torch.allclose(t ** (1 / rho), expected, rtol=1e-9, atol=1e-12)


def test_sigma_steps_rejects(fs):
    with pytest.raises(ValueError, match="at least 2"):
        fs.sigma_steps("edm", 1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        fs.sigma_steps("edm", 5, 80.0, 0.002)
    with pytest.raises(ValueError, match="unknown schedule"):
        fs.sigma_steps("karras", 5)
    with pytest.raises(ValueError, match="rho > 0"):
        fs.sigma_steps("edm", 5, rho=0)


# ----------------------------------------------------------------------------
# Agreement with chapter 03, and seeds.

@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_equals_03(fs, load, one_thread, solver):
    ch03 = load("03_heun_and_schedules")
    mix = load("01_toy_1d").default_mixture()
    latents = torch.linspace(-2, 2, 33, dtype=torch.float64)[:, None]
    for n in (2, 5, 18):
        expected = ch03.make_sampler(n, solver=solver)(mix, latents)                   # EDM ODE, Eq. 5 steps
        sigmas = fs.sigma_steps("edm", n, 0.002, 80.0, 7.0)
        x = fs.SOLVERS[solver].sample(mix, latents * 80.0, sigmas)
        # Equal up to rounding (the order of operations differs; n = 2's step 80 -> 0.002 amplifies it to 2e-12).
        assert torch.allclose(x, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp2m", "dpmpp3m", "ipndm"])
def test_generation_depends_on_seed_only(fs, load, one_thread, solver):
    ch03 = load("03_heun_and_schedules")
    images = ch03.shape_images(32, resolution=8, generator=torch.Generator().manual_seed(0))
    denoise = ch03.FiniteSetDenoiser(images)
    seeds = [3, 1, 4, 1592, 65, 35, 89, 79]
    nfe = 7 if solver == "heun" else 6
    latents = lambda s: common.StackedRandomGenerator("cpu", s).randn([len(s), 3, 8, 8], dtype=torch.float64)
    x8 = fs.make_sampler(solver, nfe)(denoise, latents(seeds))
    x3 = fs.make_sampler(solver, nfe)(denoise, latents(seeds[2:5]))
    assert torch.allclose(x8[2:5], x3, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------
# The demo's report: winners per budget, and case (c)'s reuse of 07's default run.

def test_winners_names_every_solver_tied_for_best(fs):
    table = {name: [(b, 1.0) for b in fs.BUDGETS] for name in ("heun", "ipndm", "dpmpp3m")}
    table["ipndm"][0] = (fs.BUDGETS[0], 0.5)
    line = fs.winners(table, "fewest samples on another image")
    assert line.startswith(f"fewest samples on another image per budget: {fs.BUDGETS[0]}: ipndm, "
                           f"{fs.BUDGETS[1]}: heun/ipndm/dpmpp3m")


def test_matching_snapshot_needs_the_same_maths_and_a_snapshot_at_that_count(fs, load, tmp_path):
    """09 reuses a run's snapshot only if training_options.json has the same options (except those a resume may
    change, e.g. --duration) in one process and stats.jsonl records a snapshot after exactly those images."""
    ch07 = load("07_train_cifar10")
    options = ch07.parse_args(["--preset", "tiny", "--duration", "0.016", "--outdir", str(tmp_path / "mine")])

    def run_folder(name, world_size=1, snapped_kimg=16.0, **changed):
        folder = tmp_path / name
        folder.mkdir()
        saved = dict(vars(options), duration=0.064, tick=4, snap=16, outdir="out/07_train_cifar10", **changed)
        (folder / "training_options.json").write_text(json.dumps(dict(saved, world_size=world_size)))
        (folder / "stats.jsonl").write_text(json.dumps({"kimg": 8.0}) + "\n" +
                                            json.dumps({"kimg": snapped_kimg, "rank_digests": ["a/b"]}) + "\n")
        (folder / "network-snapshot-000016.pt").write_bytes(b"weights")
        return str(folder)

    assert fs.matching_snapshot(run_folder("same"), options, 16000, ch07.RESUMABLE) == \
        str(tmp_path / "same" / "network-snapshot-000016.pt")
    for name, kwargs in [("lr", dict(lr=1e-3)), ("seed", dict(seed=1)), ("ranks", dict(world_size=2)),
                         ("no snapshot at 16 kimg", dict(snapped_kimg=16.032))]:
        assert fs.matching_snapshot(run_folder(name, **kwargs), options, 16000, ch07.RESUMABLE) is None, name
    assert fs.matching_snapshot(str(tmp_path / "missing"), options, 16000, ch07.RESUMABLE) is None
