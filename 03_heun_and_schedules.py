"""03 -- Heun's 2nd-order method, time discretizations, and the paper's generalized ablation sampler.

EDM (Karras et al. 2022), Sec. 3 and Appendix D. Chapter 02 wrote the probability-flow ODE
for any sigma(t), s(t) (Eq. 4) and solved it with Euler's method. Generating an image costs
one network evaluation (NFE) per derivative, so the question of Sec. 3 is: how few NFE reach
the ODE's true solution? Three choices decide it.

* The solver. Heun's method (Algorithm 1) takes an Euler step to t_{i+1}, evaluates the
  derivative there too, and redoes the step with the average of the two slopes. Its error
  falls like h^2 instead of h. The step that ends at sigma = 0 stays Euler (the derivative
  divides by sigma), so N steps cost 2N - 1 NFE. Appendix D.2 generalizes the second
  evaluation to t' = t_i + alpha h with weights (1 - 1/(2 alpha), 1/(2 alpha)); alpha = 1 is Heun.

* The time steps. EDM spaces the noise levels as (Eq. 5)
      sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
  i.e. uniformly in sigma^(1/rho): rho = 1 is uniform in sigma, rho -> infinity geometric.
  Earlier samplers used uniform t in VP's time (from 1 to epsilon_s = 1e-3), a geometric
  sequence in sigma^2 (VE), or the u_j table of improved DDPM (iDDPM, Nichol & Dhariwal).
  Appendix D.1: rho = 3 nearly equalizes the local truncation error of every step, but
  rho = 7 -- which spends more steps at low sigma -- gives better images.

* The formulation sigma(t), s(t) of chapter 02 (schedule vp | ve | linear, scaling vp | none).

`ablation_sampler` combines every choice the paper ablates, with the official API, so its
numbers can be compared one for one with the official generate.py. With solver='heun',
discretization='edm', schedule='linear', scaling='none' it is exactly chapter 04's EDM sampler.

The demo measures what the paper measures with FID, but exactly: with the *ideal* denoiser
(a 1-D Gaussian mixture, and the ideal denoiser of a finite set of images -- the softmax-
weighted average of the training images), the only error left is the solver's truncation
error, which we compare against a many-step Heun reference. On the finite image set the ODE
carries each latent to one training image, so a truncation error shows up as landing on a
*different* image; the tables count how often that happens.

What the demo finds (default settings): on images, Heun on the EDM ODE sends 2% of the
samples to another image at 31 NFE and none at 63, where Euler still misplaces 8% and 3%;
the paper's Fig. 2 ladders reproduce (VP: original sampler 13% at 31 NFE -> 8% with Heun and
Eq. 5 -> 2% with sigma(t) = t, s = 1; VE at 63 NFE: 18% -> 5% -> 0%). Heun needs 15 (images)
to 31 (toy) NFE before it beats Euler: with fewer, its steps are too long and it overshoots
(badly so in VE's coordinates). On the 1-D toy Heun is ~15x more accurate than Euler at
127 NFE, but there the four discretizations are within a factor ~2 of one another, and
rho = 5..10 beat rho = 1..3 (on images rho = 3..10 tie within the counting noise of 128
samples; the paper picks rho = 7 on FID). The local error of each step peaks
around sigma ~ 1-10, where the toy's modes and the images' basins separate; below that, the
finite-set ODE is exactly linear and Heun makes no error at all.

Run:  python 03_heun_and_schedules.py     (about 35 s on 2 CPU cores; figures in out/03_heun_and_schedules/)
"""

import math
import sys
import time

import numpy as np
import torch

import common

ode = common.load("02_ode_sampler")


# ----------------------------------------------------------------------------
# Heun's method (Algorithm 1) for the general ODE of chapter 02.

def heun(net, x, t_steps, f, class_labels=None):
    """Algorithm 1: Heun steps of Eq. 4 from x at t_steps[0] through every t_steps[i]."""
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        h = t_next - t_cur
        d_cur = ode.ode_derivative(net, x, t_cur, f, class_labels)     # line 4: Euler slope
        x_next = x + h * d_cur                                           # line 5: Euler step
        if f.sigma(t_next) != 0:                                         # line 6: 2nd-order correction
            d_prime = ode.ode_derivative(net, x_next, t_next, f, class_labels)
            x_next = x + h * (0.5 * d_cur + 0.5 * d_prime)               # line 8: trapezoidal rule
        x = x_next
    return x


# ----------------------------------------------------------------------------
# Time discretizations: N decreasing noise levels sigma_0 = sigma_max ... sigma_{N-1} = sigma_min.
# (Samplers append sigma_N = 0.)

def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80, rho=7):
    """Eq. 5: uniform steps in sigma^(1/rho)."""
    # Eq. 5's home. Deliberate twins, so that those chapters copy without this one: 01_toy_1d's
    # noise_levels (appends sigma_N = 0) and 04_stochastic_sampler's edm_sigma_steps.
    i = torch.arange(num_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_betas(sigma_min, sigma_max, epsilon_s=1e-3):
    """beta_d, beta_min of the VP schedule that runs from sigma(epsilon_s) = sigma_min to sigma(1) = sigma_max.

    ln(1 + sigma(t)^2) = beta_d t^2 / 2 + beta_min t; two points fix the two betas. With the VP
    defaults sigma_min = sigma(1e-3), sigma_max = sigma(1) this returns beta_d = 19.9, beta_min = 0.1.
    """
    a, b = math.log(sigma_min ** 2 + 1), math.log(sigma_max ** 2 + 1)
    beta_d = 2 * (a / epsilon_s - b) / (epsilon_s - 1)
    return beta_d, b - 0.5 * beta_d


def vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s=1e-3):
    """VP (Song et al.): t uniform from 1 down to epsilon_s, mapped through the VP sigma(t)."""
    sigma, _, _ = ode.vp_schedule(*vp_betas(sigma_min, sigma_max, epsilon_s))
    return sigma(1 + torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1) * (epsilon_s - 1))


def ve_sigma_steps(num_steps, sigma_min, sigma_max):
    """VE (Song et al.): t = sigma^2 geometric from sigma_max^2 to sigma_min^2."""
    i = torch.arange(num_steps, dtype=torch.float64)
    return (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1))).sqrt()


def iddpm_u(M=1000, C_1=0.001, C_2=0.008):
    """The noise levels u_0 > u_1 > ... > u_M = 0 of iDDPM's cosine schedule (Table 1).

    alpha_bar(j) = sin^2(pi/2 * j / (M (C_2 + 1))) and u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1)/alpha_bar(j), C_1) - 1).
    The official code evaluates alpha_bar on integer tensors, i.e. in float32; we do the same,
    so that the selected noise levels agree with it bit for bit (float64 would move them by ~1e-6).
    """
    # Deliberate twin: 05_preconditioning.iddpm_u_table, the same table for the iDDPM
    # preconditioner, kept entirely in float32 there as the official network code keeps it; here
    # u is float64 (alpha_bar float32) as in the official sampler. 05 must copy without 03.
    j = torch.arange(M + 1)
    alpha_bar = torch.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2                 # float32, as official
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)                        # alpha_bar(j-1) / alpha_bar(j)
    u = torch.zeros(M + 1, dtype=torch.float64)
    for k in range(M, 0, -1):     # (torch's sqrt, not math.sqrt: they differ in the last bit now and then)
        u[k - 1] = ((u[k] * u[k] + 1) / ratio[k - 1] - 1).sqrt()
    return u


def iddpm_sigma_steps(num_steps, sigma_min, sigma_max, C_1=0.001, C_2=0.008, M=1000):
    """iDDPM: num_steps entries of the u_j table inside [sigma_min, sigma_max], evenly spaced in j."""
    u = iddpm_u(M, C_1, C_2)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    index = ((len(u) - 1) / (num_steps - 1) * torch.arange(num_steps, dtype=torch.float64)).round().long()
    return u[index]


def default_sigma_range(discretization, epsilon_s=1e-3):
    """The noise range each discretization was published with (Table 1)."""
    if discretization == "vp":
        sigma, _, _ = ode.vp_schedule(19.9, 0.1)
        return sigma(epsilon_s), sigma(1)
    return {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


def sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho=7, epsilon_s=1e-3, C_1=0.001, C_2=0.008,
                M=1000):
    """Dispatch to one of the four discretizations."""
    if discretization == "vp":
        return vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s)
    if discretization == "ve":
        return ve_sigma_steps(num_steps, sigma_min, sigma_max)
    if discretization == "iddpm":
        return iddpm_sigma_steps(num_steps, sigma_min, sigma_max, C_1, C_2, M)
    return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)


# ----------------------------------------------------------------------------
# The generalized sampler of the paper's ablations (Sec. 3 and 4; official API).

def ablation_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=None, sigma_max=None, rho=7,
    solver='heun', discretization='edm', schedule='linear', scaling='none',
    epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
):
    """Every sampler of Sec. 3-4: returns float64 samples at sigma = 0 from unit-variance latents.

    Each quantity is evaluated with the same operations, in the same order, as in the official
    generate.py, so for equal latents and noise the outputs agree with it bit for bit.
    """
    if solver not in ("euler", "heun") or discretization not in ("vp", "ve", "iddpm", "edm"):
        raise ValueError(f"unknown solver {solver!r} or discretization {discretization!r}")

    # Noise range: the discretization's default, clamped to what the network supports.
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min = max(default_min if sigma_min is None else sigma_min, getattr(net, "sigma_min", 0))
    sigma_max = min(default_max if sigma_max is None else sigma_max, getattr(net, "sigma_max", float("inf")))
    round_sigma = getattr(net, "round_sigma", lambda sigma: sigma)

    # sigma(t), s(t); a VP schedule is refitted to run from sigma_min at epsilon_s to sigma_max at t = 1.
    f = ode.formulation(schedule, scaling, *vp_betas(sigma_min, sigma_max, epsilon_s))

    # Time steps: the discretization's noise levels, mapped to this formulation's t; t_N = 0.
    sigmas = sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M)
    t_steps = f.sigma_inv(round_sigma(sigmas.to(latents.device)))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    x_next = ode.initial_state(latents, t_steps[0], f)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn (Algorithm 2, lines 4-6; chapter 04): raise the noise to sigma(t_hat) = (1 + gamma) sigma(t_cur).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= f.sigma(t_cur) <= S_max else 0
        t_hat = f.sigma_inv(round_sigma(f.sigma(t_cur) + gamma * f.sigma(t_cur)))
        new_noise_std = (f.sigma(t_hat) ** 2 - f.sigma(t_cur) ** 2).clip(min=0).sqrt()
        x_hat = f.s(t_hat) / f.s(t_cur) * x_cur + new_noise_std * f.s(t_hat) * S_noise * randn_like(x_cur)

        # Euler step (Algorithm 1, lines 4-5).
        h = t_next - t_hat
        d_cur = ode.ode_derivative(net, x_hat, t_hat, f, class_labels)

        # Second-order correction, except on the last step into sigma = 0 (Appendix D.2: t' = t_hat + alpha h).
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime, x_prime = t_hat + alpha * h, x_hat + alpha * h * d_cur
            d_prime = ode.ode_derivative(net, x_prime, t_prime, f, class_labels)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

    return x_next


# ----------------------------------------------------------------------------
# Ground truth for images: the ideal denoiser of a finite training set.

class FiniteSetDenoiser:
    """D(x; sigma) = sum_k softmax_k(-|x - y_k|^2 / (2 sigma^2)) y_k: E[y | x] when y is uniform over the set.

    This is the exact minimiser of the denoising loss (Eq. 2) on a finite dataset -- what a
    network of unlimited capacity would learn. Its ODE carries every latent to one of the
    training images, so it measures a sampler's numerical error on real image-shaped data.
    """

    def __init__(self, images):
        self.images = images.to(torch.float64)
        self.flat = self.images.flatten(1)                     # [K, D]
        self.half_sq_norms = 0.5 * (self.flat ** 2).sum(1)     # |y_k|^2 / 2

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        # -|x - y|^2 / (2 sigma^2) up to a per-row constant: (x . y - |y|^2 / 2) / sigma^2.
        logits = (x.flatten(1).to(torch.float64) @ self.flat.T - self.half_sq_norms) / sigma ** 2
        return (torch.softmax(logits, dim=1) @ self.flat).reshape(x.shape)

    def nearest(self, x):
        """Index of the training image closest to each x."""
        return torch.cdist(x.flatten(1).to(torch.float64), self.flat).argmin(dim=1)


def shape_images(n, resolution=16, generator=None):
    """n small RGB images in [-1, 1]: a soft disc or square of one colour on a vertical gradient."""
    g = generator
    coords = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for _ in range(n):
        top, bottom, color = (torch.rand(3, 3, generator=g, dtype=torch.float64) * 2 - 1).unbind(0)
        background = top[:, None, None] * (1 - yy) + bottom[:, None, None] * yy
        cx, cy, r = (torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([0.6, 0.6, 0.2]) +
                     torch.tensor([0.2, 0.2, 0.12])).tolist()
        if torch.rand(1, generator=g) < 0.5:
            dist = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        else:
            dist = torch.maximum((xx - cx).abs(), (yy - cy).abs())
        mask = torch.sigmoid((r - dist) * resolution * 2)       # anti-aliased edge
        images.append(background * (1 - mask) + color[:, None, None] * mask)
    return torch.stack(images)


# ----------------------------------------------------------------------------
# Measurements.

def rms(a, b):
    return float(((a - b) ** 2).mean().sqrt())


def reference(net, latents, sigma_max, num_steps=256):
    """Near-exact ODE endpoint from x = sigma_max * latents: many Heun steps of the EDM ODE (rho = 7)."""
    return ablation_sampler(net, latents, num_steps=num_steps, sigma_min=0.002, sigma_max=sigma_max)


def wrong_image_percent(net):
    """Metric for the finite-set denoiser: % of samples that land on another training image than the reference."""
    return lambda x, ref: 100 * float((net.nearest(x) != net.nearest(ref)).double().mean())


def error_vs_nfe(net, latents, configs, heun_steps, metric=rms, reference_steps=256):
    """{config name: [(NFE, metric(sample, reference from the same first noise level))]}.

    Euler runs 2N - 1 steps and Heun N steps, so both spend exactly the same NFE.
    """
    references, results = {}, {}
    for name, kwargs in configs.items():
        results[name] = []
        for n in heun_steps:
            steps = n if kwargs["solver"] == "heun" else 2 * n - 1
            lo, hi = default_sigma_range(kwargs["discretization"])
            sigma0 = float(sigma_steps(kwargs["discretization"], steps, lo, hi)[0])
            if sigma0 not in references:
                references[sigma0] = reference(net, latents, sigma0, reference_steps)
            x = ablation_sampler(net, latents, num_steps=steps, **kwargs)
            results[name].append((2 * n - 1, metric(x, references[sigma0])))
    return results


def local_errors(net, latents, sigmas, substeps=16):
    """Error of one Heun step from the exact ODE state at each sigma_i to sigma_{i+1} (sigma_N = 0).

    The exact states come from a Heun run with `substeps` geometric sub-steps inside every
    interval (the last interval goes down to sigma_{N-1} / 1000 before its final jump to 0).
    """
    f = ode.EDM()
    x = latents.to(torch.float64) * sigmas[0]
    exact = [x]
    for i in range(len(sigmas) - 1):
        lo = sigmas[i + 1] if sigmas[i + 1] > 0 else sigmas[i] / 1000
        fine = torch.logspace(math.log10(sigmas[i]), math.log10(lo), substeps + 1, dtype=torch.float64)
        if sigmas[i + 1] == 0:
            fine = torch.cat([fine, torch.zeros(1, dtype=torch.float64)])
        x = heun(net, x, fine, f)
        exact.append(x)
    return [rms(heun(net, exact[i], sigmas[i:i + 2], f), exact[i + 1]) for i in range(len(sigmas) - 1)]


# ----------------------------------------------------------------------------
# Figures and tables.

def plot_discretizations(num_steps, file):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for disc in ("vp", "ve", "iddpm", "edm"):
        s = sigma_steps(disc, num_steps, *default_sigma_range(disc))
        ax.semilogy(range(num_steps), s.numpy(), "o-", ms=3, label=disc)
    for rho in (1, 3):
        ax.semilogy(range(num_steps), edm_sigma_steps(num_steps, rho=rho).numpy(), "--", lw=1, label=f"edm, rho={rho}")
    ax.set_xlabel("step i")
    ax.set_ylabel("sigma_i")
    ax.set_title(f"Time discretizations, N = {num_steps} (defaults of Table 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_error_vs_nfe(panels, file, ylabel, log=True):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels.items()):
        for name, points in results.items():
            nfe, err = zip(*points)
            ax.plot(nfe, err, "o-" if "heun" in name or "EDM" in name else "s--", ms=4, label=name)
        ax.set_xscale("log")
        ax.set_xticks(nfe, [str(n) for n in nfe])
        ax.set_yscale("log" if log else "linear")
        ax.set_xlabel("NFE")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_local_errors(panels, file):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for rho, (sigmas, errors) in curves.items():
            ax.loglog(sigmas, errors, "o-", ms=3, label=f"rho = {rho}")
        ax.set_xlabel("sigma_i at the start of the step")
        ax.set_ylabel("local error of one Heun step (RMS)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def print_table(title, results, fmt=".2e"):
    nfes = [n for n, _ in next(iter(results.values()))]
    print(f"\n{title}")
    print(f"{'':<30}" + "".join(f"{'NFE=' + str(n):>10}" for n in nfes))
    for name, points in results.items():
        print(f"{name:<30}" + "".join(f"{e:>10{fmt}}" for _, e in points))


# ----------------------------------------------------------------------------

SOLVER_GRID = {f"{solver}, {disc} steps": dict(solver=solver, discretization=disc)
               for disc in ("vp", "ve", "iddpm", "edm") for solver in ("euler", "heun")}

# The paper's Fig. 2 ladders: original sampler -> Heun & EDM time steps -> EDM sigma(t), s(t).
LADDER = {
    "VP orig (euler, vp, vp/vp)": dict(solver="euler", discretization="vp", schedule="vp", scaling="vp"),
    "VP + heun & edm steps": dict(solver="heun", discretization="edm", schedule="vp", scaling="vp"),
    "VE orig (euler, ve, ve/none)": dict(solver="euler", discretization="ve", schedule="ve", scaling="none"),
    "VE + heun & edm steps": dict(solver="heun", discretization="edm", schedule="ve", scaling="none"),
    "EDM (heun, edm, linear/none)": dict(solver="heun", discretization="edm", schedule="linear", scaling="none"),
}


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    positive = common.number(int, low=1)
    parser.add_argument("--points", type=positive, default=1024, help="1-D toy latents (default: 1024)")
    parser.add_argument("--images", type=positive, default=256, help="size of the finite image set (default: 256)")
    parser.add_argument("--latents", type=positive, default=128,
                        help="image latents per configuration (default: 128)")
    parser.add_argument("--local-latents", type=positive, default=32,
                        help="latents for the per-step local error study (default: 32)")
    return parser.parse_args(argv)


def demo(args):
    device = common.get_device(args.device)
    torch.set_num_threads(1)  # these small tensors run fastest without intra-op threads on a shared CPU
    outdir = common.out_dir(__file__, args.outdir)
    common.seed_all(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()

    toy = common.load("01_toy_1d").default_mixture()
    toy_latents = torch.randn(args.points, 1, generator=g, dtype=torch.float64).to(device)
    images = shape_images(args.images, generator=g).to(device)
    image_net = FiniteSetDenoiser(images)
    image_latents = torch.randn(args.latents, *images.shape[1:], generator=g, dtype=torch.float64).to(device)

    plot_discretizations(18, f"{outdir}/discretizations.png")

    # (1) Error vs NFE, solver x discretization, on the EDM ODE (schedule linear, scaling none).
    heun_steps = [4, 8, 16, 32, 64]
    wrong = wrong_image_percent(image_net)
    grid_toy = error_vs_nfe(toy, toy_latents, SOLVER_GRID, heun_steps)
    # (On images 128 reference steps suffice: the basins are decided at high sigma; 256 land on the same images.)
    grid_img = error_vs_nfe(image_net, image_latents, SOLVER_GRID, heun_steps[:4], wrong, reference_steps=128)
    ladder = error_vs_nfe(image_net, image_latents, LADDER, heun_steps[:4], wrong, reference_steps=128)
    print_table("1-D toy: RMS error vs a 256-step Heun reference (sigma(t) = t, s = 1)", grid_toy)
    print_table("Images: % of samples landing on another training image than a 128-step Heun reference "
                "(sigma(t) = t, s = 1)",
                grid_img, ".1f")
    print_table("Images, the paper's Fig. 2 ladders: % landing on another image", ladder, ".1f")
    plot_error_vs_nfe({"1-D toy: RMS error vs reference": grid_toy}, f"{outdir}/error_vs_nfe_toy.png", "RMS error")
    plot_error_vs_nfe({"images: solver x discretization": grid_img, "images: Fig. 2 ladders": ladder},
                      f"{outdir}/error_vs_nfe_images.png", "% samples on another image", log=False)

    # (2) Local truncation error per step vs sigma, for several rho (Eq. 5), N = 18.
    rhos = (1, 2, 3, 5, 7, 10)
    local = {"1-D toy": {}, "images": {}}
    print(f"\nEq. 5 with N = 18 Heun steps (35 NFE) and several rho: the worst single step, and the endpoint error")
    print(f"{'rho':>5}{'toy: worst local':>18}{'at sigma':>10}{'toy: global':>13}"
          f"{'img: worst local':>18}{'at sigma':>10}{'img: % wrong':>14}")
    for rho in rhos:
        sigmas = torch.cat([edm_sigma_steps(18, rho=rho), torch.zeros(1, dtype=torch.float64)]).to(device)
        row = ""
        for title, net, lat, metric in (("1-D toy", toy, toy_latents, rms),
                                        ("images", image_net, image_latents, wrong)):
            err = np.array(local_errors(net, lat[:args.local_latents], sigmas))
            local[title][rho] = (sigmas[:-1].cpu().numpy(), err)
            x = ablation_sampler(net, lat, num_steps=18, rho=rho)
            worst = err.argmax()
            row += f"{err[worst]:>18.2e}{float(sigmas[worst]):>10.3f}"
            ref = reference(net, lat, 80.0, 256 if net is toy else 128)
            row += f"{metric(x, ref):>13.2e}" if net is toy else f"{metric(x, ref):>14.1f}"
        print(f"{rho:>5}{row}")
    plot_local_errors(local, f"{outdir}/local_error_vs_sigma.png")

    # (3) Look at it: training images, the reference samples, and three samplers at 15 NFE.
    rows = [images[:8]]
    for kwargs, steps in ((dict(solver="heun"), 64), (dict(solver="heun"), 8), (dict(solver="euler"), 15),
                          (LADDER["VP orig (euler, vp, vp/vp)"], 15)):
        rows.append(ablation_sampler(image_net, image_latents[:8], num_steps=steps, **kwargs))
    grid = torch.cat(rows).float().repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)   # 4x pixels, to see
    common.save_grid(grid, f"{outdir}/samples.png", nrow=8)
    print(f"\nsamples.png rows: training images | Heun 64 steps (the reference) | at 15 NFE: Heun 8 steps | "
          f"Euler 15 steps (EDM ODE) | original VP sampler")
    print(f"figures in {outdir}/  ({time.time() - start:.1f} s)")


def main(argv=None):
    args = parse_args(argv)
    try:
        demo(args)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
