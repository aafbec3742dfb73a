"""02 -- The probability-flow ODE for any noise schedule sigma(t) and scale s(t); Euler's method.

EDM (Karras et al. 2022, Sec. 2 and Table 1) observes that the "VP", "VE" and DDIM samplers
of earlier papers all solve the *same* deterministic ODE, written in different coordinates.
Two functions of time t pick the coordinates:

* sigma(t), the noise schedule: the noise level reached at time t;
* s(t), the scale schedule: the state is x = s(t) * x~, where x~ is a noisy image at level sigma(t).

With the ideal denoiser D(x; sigma) = E[y | x] and Tweedie's identity
grad log p(x; sigma) = (D(x; sigma) - x) / sigma^2 (Eq. 3), the paper's Eq. 4 becomes

    dx/dt = (sigma_dot/sigma + s_dot/s) * x  -  (sigma_dot * s / sigma) * D(x / s; sigma)      (Eq. 4)

The three formulations of Table 1:

    VP   sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1),  s(t) = 1 / sqrt(1 + sigma(t)^2)
         (beta_d = 19.9, beta_min = 0.1; Song et al.'s "variance preserving" SDE)
    VE   sigma(t) = sqrt(t),                                      s(t) = 1
    EDM  sigma(t) = t,                                            s(t) = 1   (as in DDIM)

Whatever the coordinates, x~ = x / s follows one curve as sigma falls: the exact solutions
agree, and only the *numerical* error of a solver differs. EDM's choice makes Eq. 4 read
dx/dt = (x - D(x; t)) / t, so the tangent at every point aims straight at the denoiser output
(one Euler step from t to 0 lands exactly on D(x; t)), and the trajectories are nearly
straight -- which is what a low-order solver wants.

This chapter implements the general ODE, Euler's method over any time discretization, and
measures, on the 1-D toy of chapter 01 where the denoiser is exact, how far Euler's answer
is from the true ODE solution under each formulation, all stepping through the *same*
noise levels. What it finds on this toy: VE's coordinates are by far the worst (at 16 steps
its error is ~6x EDM's); VP and EDM are close, VP even a little ahead. EDM's Euler step is
exact whenever D stays constant over the step -- its error comes only from the change of
D -- which is what chapter 03's second-order Heun step exploits. Chapter 03 adds Heun's
method and the choice of time steps.

Run:  python 02_ode_sampler.py      (well under a minute on 2 CPU cores; figures in out/02_ode_sampler/)
"""

import math
import sys
import time
from typing import Callable, NamedTuple

import torch

import common


# ----------------------------------------------------------------------------
# Formulations (Table 1): sigma(t), its derivative and inverse; s(t) and its derivative.
# All take and return float64 tensors.

class Formulation(NamedTuple):
    name: str
    sigma: Callable        # t -> sigma(t)
    sigma_deriv: Callable  # t -> d sigma / dt
    sigma_inv: Callable    # sigma -> t
    s: Callable            # t -> s(t)
    s_deriv: Callable      # t -> d s / dt


def vp_schedule(beta_d=19.9, beta_min=0.1):
    """sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1): the noise level of Song et al.'s VP SDE."""
    # Written exactly as the official code evaluates it (not with expm1), so that sampler outputs
    # agree with it to the last bit; t may be a tensor or a Python number. This chapter's samplers
    # evaluate it in float64. Deliberate twins: 05_preconditioning.vp_sigma / vp_sigma_inv, the same
    # formulas for the VP preconditioner, evaluated there on the network's float32 noise levels
    # (05 must copy without 02).
    def sigma(t):
        return (math.e ** (0.5 * beta_d * t ** 2 + beta_min * t) - 1) ** 0.5

    def sigma_deriv(t):
        # sigma^2 + 1 = e^g with g = beta_d t^2 / 2 + beta_min t, so 2 sigma sigma_dot = g' (sigma^2 + 1).
        return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

    def sigma_inv(sigma):
        # Solve beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2) for the positive root.
        return ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d

    return sigma, sigma_deriv, sigma_inv


def ve_schedule():
    """sigma(t) = sqrt(t): the variance, not the std, grows linearly in time (Song et al.'s VE SDE)."""
    return (lambda t: t.sqrt()), (lambda t: 0.5 / t.sqrt()), (lambda sigma: sigma ** 2)


def linear_schedule():
    """sigma(t) = t: time *is* the noise level (DDIM, and EDM's choice)."""
    return (lambda t: t), (lambda t: torch.ones_like(t)), (lambda sigma: sigma)


def vp_scaling(sigma, sigma_deriv):
    """s(t) = 1 / sqrt(1 + sigma(t)^2): keeps Var[x] = s^2 (1 + sigma^2) = 1 for unit-variance data."""
    def s(t):
        return 1 / (1 + sigma(t) ** 2).sqrt()

    def s_deriv(t):
        return -sigma(t) * sigma_deriv(t) * s(t) ** 3

    return s, s_deriv


def no_scaling():
    """s(t) = 1."""
    return (lambda t: torch.ones_like(t)), (lambda t: torch.zeros_like(t))


def formulation(schedule, scaling, beta_d=19.9, beta_min=0.1):
    """Combine a noise schedule ('vp' | 've' | 'linear') with a scaling ('vp' | 'none')."""
    schedules = {"vp": lambda: vp_schedule(beta_d, beta_min), "ve": ve_schedule, "linear": linear_schedule}
    if schedule not in schedules or scaling not in ("vp", "none"):
        raise ValueError(f"unknown schedule {schedule!r} or scaling {scaling!r}")
    sigma, sigma_deriv, sigma_inv = schedules[schedule]()
    s, s_deriv = vp_scaling(sigma, sigma_deriv) if scaling == "vp" else no_scaling()
    return Formulation(f"{schedule}/{scaling}", sigma, sigma_deriv, sigma_inv, s, s_deriv)


def VP(beta_d=19.9, beta_min=0.1):
    return formulation("vp", "vp", beta_d, beta_min)._replace(name="VP")


def VE():
    return formulation("ve", "none")._replace(name="VE")


def EDM():
    return formulation("linear", "none")._replace(name="EDM")


# ----------------------------------------------------------------------------
# The ODE and Euler's method.

def ode_derivative(net, x, t, f, class_labels=None):
    """dx/dt of Eq. 4 at state x (in the formulation's own coordinates) and time t.

    Eq. 4 is dx = [s_dot/s x - s^2 sigma_dot sigma grad_x log p(x/s; sigma)] dt, where the
    gradient is taken with respect to x, so it carries a factor 1/s. Replacing the score by
    the denoiser (Eq. 3: grad log p(x~; sigma) = (D(x~; sigma) - x~) / sigma^2) gives the form
    below; the network only ever sees the unscaled x~ = x / s and the noise level sigma(t).
    """
    sigma, s = f.sigma(t), f.s(t)
    denoised = net(x / s, sigma, class_labels).to(torch.float64)
    return (f.sigma_deriv(t) / sigma + f.s_deriv(t) / s) * x - f.sigma_deriv(t) * s / sigma * denoised


def euler(net, x, t_steps, f, class_labels=None):
    """Euler's method for Eq. 4 from x at t_steps[0] through every t_steps[i]; one NFE per step.

    The derivative is only ever evaluated at t_cur > 0, so t_steps may end at 0 (sigma = 0).
    """
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = x + (t_next - t_cur) * ode_derivative(net, x, t_cur, f, class_labels)
    return x


def initial_state(latents, t0, f):
    """x(t_0) = s(t_0) sigma(t_0) n for unit-variance latents n: noise dominates at sigma_max."""
    return latents.to(torch.float64) * (f.sigma(t0) * f.s(t0))


def sample(net, latents, sigma_steps, f, class_labels=None):
    """Euler sampling of x~(sigma = 0) from unit latents through the noise levels sigma_steps (ending at 0).

    The noise levels are mapped to each formulation's own times, t_i = sigma^-1(sigma_i), so that
    different formulations can be compared at identical noise levels.
    """
    t_steps = f.sigma_inv(sigma_steps)
    x = euler(net, initial_state(latents, t_steps[0], f), t_steps, f, class_labels)
    return x / f.s(t_steps[-1])


# ----------------------------------------------------------------------------
# Demo: trajectories and Euler's error on the exact 1-D toy.

def reference_solution(net, latents, noise_levels, num_steps=2048):
    """The ODE's endpoint, far more accurate than any run measured: Richardson extrapolation of two fine Euler runs.

    Euler's global error is c/N + O(1/N^2), so 2 x_{2N} - x_N cancels the first-order term.
    """
    f = EDM()
    fine = sample(net, latents, noise_levels(2 * num_steps), f)
    coarse = sample(net, latents, noise_levels(num_steps), f)
    return 2 * fine - coarse


def plot_trajectories(mix, formulations, file, sigma_start=3.0, num_points=13):
    """Fig. 3 of the paper in spirit: x(t) for the same starting points, one panel per formulation."""
    import matplotlib.pyplot as plt
    x0 = torch.linspace(-2.4, 2.4, num_points, dtype=torch.float64) * sigma_start / 3
    fig, axes = plt.subplots(1, len(formulations), figsize=(5 * len(formulations), 4.5))
    for ax, f in zip(axes, formulations):
        t_end = f.sigma_inv(torch.tensor(sigma_start, dtype=torch.float64))
        t = torch.linspace(float(t_end), 0, 400, dtype=torch.float64)
        # Background: the density of x = s x~ at each t, p(x / s; sigma(t)) / s, normalised per column.
        tt = t.flip(0).clamp(min=1e-4)
        s, sigma = f.s(tt), f.sigma(tt)
        grid = torch.linspace(-3, 3, 300, dtype=torch.float64)
        dens = mix.density(grid[None, :] / s[:, None], sigma[:, None]) / s[:, None]
        dens = dens / dens.max(dim=1, keepdim=True).values
        ax.imshow(dens.T.numpy(), origin="lower", aspect="auto", cmap="Greys", alpha=0.6,
                  extent=[0, float(t_end), -3, 3])
        # Trajectories: many small Euler steps, recorded one interval at a time.
        x = initial_state(x0 / sigma_start, t[0], f)
        path = [x]
        for i in range(len(t) - 1):
            x = euler(mix, x, t[i:i + 2], f)
            path.append(x)
        path = torch.stack(path)
        for k in range(num_points):
            ax.plot(t.numpy(), path[:, k].numpy(), color="tab:blue", lw=1)
        # Tangents at a few points, extended to t = 0, and the denoiser output D(x/s; sigma) there (red).
        for j in (120, 240):
            for k in range(1, num_points, 3):
                tj, xj = t[j], path[j, k]
                slope = ode_derivative(mix, xj, tj, f)
                ax.plot([float(tj), 0.0], [float(xj), float(xj - tj * slope)], color="tab:orange", lw=1.2, ls="--")
                ax.plot([0.0], [float(mix(xj / f.s(tj), f.sigma(tj)))], "o", color="tab:red", ms=6, clip_on=False,
                        zorder=5)
        ax.set_xlim(0, float(t_end))
        ax.set_ylim(-3, 3)
        ax.set_xlabel("t")
        ax.set_title(f"{f.name}: sigma(t), s(t) of Table 1")
    axes[0].set_ylabel("x = s(t) x~")
    fig.suptitle("Same starting points, three formulations. Dashed: tangents extended to t = 0; "
                 "red: the denoiser output there. Only EDM's tangents hit it.", fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_errors(steps, errors, file):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, err in errors.items():
        ax.loglog(steps, err, "o-", label=name)
    ax.loglog(steps, [errors["EDM"][0] * steps[0] / n for n in steps], "k:", lw=1, label="slope -1 (first order)")
    ax.set_xlabel("Euler steps (= NFE)")
    ax.set_ylabel("RMS error of x(sigma = 0)")
    ax.set_title("Euler's error vs the exact ODE solution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--samples", type=common.number(int, low=2), default=2048,
                        help="starting points (default: 2048)")
    parser.add_argument("--max-steps", type=common.number(int, low=4), default=256,
                        help="largest Euler step count (default: 256)")
    return parser.parse_args(argv)


def demo(args):
    device = common.get_device(args.device)
    torch.set_num_threads(1)  # 1-D toy tensors are far too small for intra-op threads to pay off
    outdir = common.out_dir(__file__, args.outdir)
    common.seed_all(args.seed)
    toy = common.load("01_toy_1d")
    mix = toy.default_mixture()
    formulations = [VP(), VE(), EDM()]
    start = time.time()

    plot_trajectories(mix, formulations, f"{outdir}/trajectories.png")

    # Same unit latents, same noise levels (80 -> 0.002 -> 0) for every formulation.
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.samples, 1, generator=g, dtype=torch.float64).to(device)
    truth = mix.sample(args.samples, g)
    reference = reference_solution(mix, latents, toy.noise_levels)
    steps = [n for n in (4, 8, 16, 32, 64, 128, 256, 512) if n <= args.max_steps]
    errors = {f.name: [] for f in formulations}
    w1 = {f.name: [] for f in formulations}
    for n in steps:
        for f in formulations:
            x = sample(mix, latents, toy.noise_levels(n).to(device), f)
            errors[f.name].append(float(((x - reference) ** 2).mean().sqrt()))
            w1[f.name].append(toy.wasserstein1(x.cpu(), truth))
    plot_errors(steps, errors, f"{outdir}/euler_error.png")

    print("Euler through the same noise levels for every formulation (80 -> 0.002 by Eq. 5 with rho = 7, then 0)")
    print("RMS error of the endpoint against the exact ODE solution | W1 distance to the data")
    print(f"{'steps':>6} | " + "".join(f"{f.name:>10}" for f in formulations) + " | "
          + "".join(f"{f.name:>10}" for f in formulations))
    for i, n in enumerate(steps):
        print(f"{n:>6} | " + "".join(f"{errors[f.name][i]:>10.4f}" for f in formulations) + " | "
              + "".join(f"{w1[f.name][i]:>10.4f}" for f in formulations))
    print(f"W1 of the exact ODE solution to the data: {toy.wasserstein1(reference.cpu(), truth):.4f}"
          f"  (sampling noise of {args.samples} points)")
    print(f"\nfigures in {outdir}/  ({time.time() - start:.1f} s)")


def main(argv=None):
    args = parse_args(argv)
    try:
        demo(args)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
