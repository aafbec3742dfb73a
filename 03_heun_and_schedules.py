"""03 -- Heun's 2nd-order method, time discretizations, and the paper's generalized ablation sampler.

EDM (Karras et al. 2022), Sec. 3 and App. D. Generating an image costs one network evaluation (NFE) per
derivative of the ODE (Eq. 4, chapter 02), so Sec. 3 asks how few NFE reach its true solution. Three choices:

* The solver. Heun's method (Algorithm 1) takes an Euler step to t_{i+1}, evaluates the slope there too and
  redoes the step with the average of both: error O(h^2) instead of O(h). The last step, into sigma = 0,
  stays Euler, so N steps cost 2N - 1 NFE. App. D.2 generalizes the second point to t_i + alpha h.
* The time steps. EDM's Eq. 5 (common.edm_sigma_steps) is uniform in sigma^(1/rho); rho = 7 spends more
  steps at low sigma (App. D.1). Earlier samplers used uniform t in VP's time, a geometric sequence in
  sigma^2 (VE), or the table of improved DDPM (iDDPM) -- Table 1, `sigma_steps`.
* The formulation sigma(t), s(t) of chapter 02.

`ablation_sampler` combines every choice the paper ablates; with Heun on Eq. 5's steps and EDM's formulation
it is chapter 04's Algorithm 2. The demo measures what the paper measures with FID, but exactly: with the
ideal denoisers of chapter 01's toy and of chapter 02's finite image set the only error left is the solver's,
and on the image set a truncation error shows up as landing on a *different* training image.

Run:  python 03_heun_and_schedules.py     (about 40 s on 2 CPU cores; figures in out/03_heun_and_schedules/)
"""

import math
import time

import numpy as np
import torch

import common

ch02 = common.load("02_ode_sampler")


# ----------------------------------------------------------------------------
# Heun's method (Algorithm 1) for the general ODE of chapter 02.

def heun(net, x, t_steps, f, extra_args=None):
    """Algorithm 1: Heun steps of Eq. 4 from x at t_steps[0] through every t_steps[i], in formulation f's own
    time and coordinates; the denoiser is called as `net(x, sigma, **extra_args)` (02's ode_derivative)."""
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        h = t_next - t_cur
        d_cur = ch02.ode_derivative(net, x, t_cur, f, extra_args)     # line 4: Euler slope
        x_next = x + h * d_cur                                           # line 5: Euler step
        if f.sigma(t_next) != 0:                                         # line 6: 2nd-order correction
            d_prime = ch02.ode_derivative(net, x_next, t_next, f, extra_args)
            x_next = x + h * (0.5 * d_cur + 0.5 * d_prime)               # line 8: trapezoidal rule
        x = x_next
    return x


def ablation_sampler(net, x, sigmas, extra_args=None, randn_like=torch.randn_like, f=None, solver="heun", alpha=1,
                     S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """Every sampler of Sec. 3-4: from the noisy images x at sigmas[0] through every sigmas[i] (ending at 0), in
    formulation f (default EDM), Euler or Heun (App. D.2: second point at t + alpha h), with Algorithm 2's churn.
    Returns float64 images at sigma = 0 (common.py's sampler convention; `net.round_sigma` rounds the churned
    noise levels where the network has one). Each quantity is evaluated with the same operations, in the same
    order, as in the official generate.py."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r}; choose euler or heun")
    f = f or ch02.EDM()
    round_sigma = getattr(net, "round_sigma", lambda sigma: sigma)
    num_steps = len(sigmas) - 1
    t_steps = torch.cat([f.sigma_inv(sigmas[:-1]), torch.zeros_like(sigmas[:1])])    # the formulation's times

    x_next = x.to(torch.float64) * f.s(t_steps[0])                       # x = s(t) x~
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn (Algorithm 2, lines 4-6; chapter 04): raise the noise to sigma(t_hat) = (1 + gamma) sigma(t_cur).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= f.sigma(t_cur) <= S_max else 0
        t_hat = f.sigma_inv(round_sigma(f.sigma(t_cur) + gamma * f.sigma(t_cur)))
        new_noise_std = (f.sigma(t_hat) ** 2 - f.sigma(t_cur) ** 2).clip(min=0).sqrt()
        x_hat = f.s(t_hat) / f.s(t_cur) * x_cur + new_noise_std * f.s(t_hat) * S_noise * randn_like(x_cur)

        # Euler step (Algorithm 1, lines 4-5).
        h = t_next - t_hat
        d_cur = ch02.ode_derivative(net, x_hat, t_hat, f, extra_args)

        # Second-order correction, except on the last step into sigma = 0 (App. D.2: t' = t_hat + alpha h).
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime, x_prime = t_hat + alpha * h, x_hat + alpha * h * d_cur
            d_prime = ch02.ode_derivative(net, x_prime, t_prime, f, extra_args)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


# ----------------------------------------------------------------------------
# Time discretizations of Table 1: N decreasing noise levels sigma_max ... sigma_min, then sigma_N = 0.

def vp_betas(sigma_min, sigma_max, epsilon_s=1e-3):
    """beta_d, beta_min of the VP schedule running from sigma(epsilon_s) = sigma_min to sigma(1) = sigma_max.

    ln(1 + sigma(t)^2) = beta_d t^2 / 2 + beta_min t; two points fix the two betas. With the VP
    defaults sigma_min = sigma(1e-3), sigma_max = sigma(1) this returns beta_d = 19.9, beta_min = 0.1.
    """
    a, b = math.log(sigma_min ** 2 + 1), math.log(sigma_max ** 2 + 1)
    beta_d = 2 * (a / epsilon_s - b) / (epsilon_s - 1)
    return beta_d, b - 0.5 * beta_d


def vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s=1e-3, rho=1):
    """VP (Song et al.): t uniform from 1 down to epsilon_s, mapped through the VP sigma(t) fitted to the range.
    rho > 1 spaces t^(1/rho) uniformly instead (DPM-Solver's "time_quadratic" is rho = 2; chapter 09)."""
    sigma, _, _ = ch02.vp_schedule(*vp_betas(sigma_min, sigma_max, epsilon_s))
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    return sigma((1 + i * (epsilon_s ** (1 / rho) - 1)) ** rho)


def ve_sigma_steps(num_steps, sigma_min, sigma_max):
    """VE (Song et al.): t = sigma^2 geometric from sigma_max^2 to sigma_min^2."""
    i = torch.arange(num_steps, dtype=torch.float64)
    return (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1))).sqrt()


def iddpm_sigma_steps(num_steps, sigma_min, sigma_max, C_1=0.001, C_2=0.008, M=1000):
    """iDDPM: num_steps entries of the u_j table (common.iddpm_noise_levels, float64 as the official sampler)
    inside [sigma_min, sigma_max], evenly spaced in j."""
    u = common.iddpm_noise_levels(M, C_1, C_2)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    index = ((len(u) - 1) / (num_steps - 1) * torch.arange(num_steps, dtype=torch.float64)).round().long()
    return u[index]


def default_sigma_range(discretization, epsilon_s=1e-3):
    """The noise range each discretization was published with (Table 1)."""
    if discretization == "vp":
        sigma, _, _ = ch02.vp_schedule(19.9, 0.1)
        return sigma(epsilon_s), sigma(1)
    return {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")


def sigma_steps(discretization, num_steps, sigma_min=None, sigma_max=None, rho=7, net=None, epsilon_s=1e-3):
    """num_steps noise levels of a Table 1 discretization, then sigma_N = 0 (float64). The range defaults to the
    discretization's own (`default_sigma_range`); with `net`, it is clamped to what the network supports and
    every level rounded to one it has, as the official sampler does."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {discretization!r}; choose from {', '.join(DISCRETIZATIONS)}")
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    lo, hi = common.noise_range(net, default_min if sigma_min is None else sigma_min,
                                default_max if sigma_max is None else sigma_max)
    if discretization == "edm":
        return common.edm_sigma_steps(num_steps, lo, hi, rho, net)                  # Eq. 5
    levels = {"vp": lambda: vp_sigma_steps(num_steps, lo, hi, epsilon_s), "ve": lambda: ve_sigma_steps(num_steps, lo, hi),
              "iddpm": lambda: iddpm_sigma_steps(num_steps, lo, hi)}[discretization]()
    return common.with_zero(levels, net)


def make_sampler(num_steps=18, sigma_min=None, sigma_max=None, rho=7, solver="heun", discretization="edm",
                 schedule="linear", scaling="none", epsilon_s=1e-3, alpha=1, **churn):
    """The ablation sampler with the official generate.py's options, as 08's protocol takes a sampler:
    sample(net, latents, extra_args=None, randn_like=torch.randn_like) from unit latents; `sample.settings`
    names it. The noise range is the discretization's, clamped to the network's, and a VP schedule sigma(t)
    is refitted to run from sigma_min at epsilon_s to sigma_max at t = 1, as the official code does."""
    if solver not in ("euler", "heun") or discretization not in DISCRETIZATIONS:
        raise ValueError(f"the ablation sampler's solver is euler or heun and its discretization one of "
                         f"{', '.join(DISCRETIZATIONS)}, not {solver} and {discretization}")
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min, sigma_max = default_min if sigma_min is None else sigma_min, default_max if sigma_max is None else sigma_max

    def sample(net, latents, extra_args=None, randn_like=torch.randn_like):
        lo, hi = common.noise_range(net, sigma_min, sigma_max)
        sigmas = sigma_steps(discretization, num_steps, lo, hi, rho, net, epsilon_s).to(latents.device)
        f = ch02.formulation(schedule, scaling, *vp_betas(lo, hi, epsilon_s))
        return ablation_sampler(net, latents.to(torch.float64) * sigmas[0], sigmas, extra_args, randn_like, f,
                                solver, alpha, **churn)
    sample.settings = dict(function="ablation_sampler", solver=solver, sigma_steps=discretization,
                           options=dict(num_steps=num_steps, schedule=schedule, scaling=scaling, **churn))
    return sample


# ----------------------------------------------------------------------------
# Ground truth for images, from chapter 02: the ideal denoiser of a finite set of small shape images.
# (Named here too, as ch03.FiniteSetDenoiser and ch03.shape_images, for the later chapters.)

FiniteSetDenoiser = ch02.FiniteSetDenoiser
shape_images = ch02.shape_images


# ----------------------------------------------------------------------------
# Measurements.

def reference(net, latents, sigma_max, num_steps=256):
    """Near-exact ODE endpoint from x = sigma_max * latents: many Heun steps of the EDM ODE (rho = 7)."""
    return make_sampler(num_steps, sigma_min=0.002, sigma_max=sigma_max)(net, latents)


def wrong_image_percent(net):
    """Metric for the finite-set denoiser: % of samples that land on another training image than the reference."""
    return lambda x, ref: 100 * float((net.nearest(x) != net.nearest(ref)).double().mean())


def error_vs_nfe(net, latents, configs, heun_steps, metric=common.rms, reference_steps=256):
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
            x = make_sampler(steps, **kwargs)(net, latents)
            results[name].append((2 * n - 1, metric(x, references[sigma0])))
    return results


def local_errors(net, latents, sigmas):
    """RMS error of one Heun step (EDM ODE) from the exact state at each sigma_i to sigma_{i+1} (sigma_N = 0)."""
    f = ch02.EDM()
    exact = ch02.exact_states(net, latents.to(torch.float64) * sigmas[0], sigmas, substeps=16)
    return [common.rms(heun(net, exact[i], sigmas[i:i + 2], f), exact[i + 1]) for i in range(len(sigmas) - 1)]


def heun_step_weights(r):
    """Weights of one Heun step of the EDM ODE from sigma_0 to sigma_1 = sigma_0 / r, on D_0 and D_1 - D_0.

    With d = (x - D) / sigma (Eq. 4 for sigma(t) = t, s = 1) the step works out to
        x_1 = x_0 / r + (1 - 1/r) D_0 + (r - 1)/2 (D_1 - D_0),    D_0 = D(x_0; sigma_0), D_1 = D(x'; sigma_1).
    The exact ODE gives x_1 = x_0 / r + (an average of D over the step with positive weights summing to
    1 - 1/r), so it can move x toward D_1 by at most (1 - 1/r) (D_1 - D_0). Heun's weight (r - 1)/2
    exceeds that once r > 2: a step that more than halves sigma extrapolates the change of D.
    """
    return 1 - 1 / r, (r - 1) / 2


def heun_step_weight_ve(r):
    """Heun's weight on D_1 - D_0 in one step of the VE ODE (sigma(t) = sqrt(t), s = 1) from sigma_0 to sigma_0 / r.

    In t = sigma^2 the ODE is dx/dt = (x - D) / (2t) and the step ratio is R = r^2; the trapezoidal rule's
    second slope (x' - D_1) / (2 t_1) enters with h / 2 = (t_1 - t_0) / 2, i.e. with weight (R - 1)/4 on
    D_1 - D_0. That is (r + 1)/2 times the EDM ODE's (r - 1)/2 (heun_step_weights): the same noise levels
    make Heun extrapolate more in VE's coordinates, from r = sqrt(3) on instead of r = 2.
    """
    return (r * r - 1) / 4


def heun_step_damage(net, latents, sigmas, metric, reference_steps=256):
    """For each step of a Heun run through `sigmas` (ending in 0): the error at sigma = 0 when that one step is
    Heun's and the rest of the way is exact (from the exact state at sigma_i; then the reference solve)."""
    f = ch02.EDM()
    exact = ch02.exact_states(net, latents.to(torch.float64) * sigmas[0], sigmas)
    damage = []
    for i in range(len(sigmas) - 1):
        x = heun(net, exact[i], sigmas[i:i + 2], f)
        if sigmas[i + 1] > 0:
            x = reference(net, x / sigmas[i + 1], float(sigmas[i + 1]), reference_steps)
        damage.append(metric(x, exact[-1]))
    return damage


def first_step_study(net, latents, discretization, num_steps, reference_steps=128):
    """The first Heun step of a discretization on the finite image set, and how much of the damage it does.

    Returns sigma_0, sigma_1 and % of samples landing on another image than the reference for: the first
    step alone (one Heun step, then the exact ODE), the whole run, and the run with the first step split in
    two at the geometric mean (one Heun step more, +2 NFE).
    """
    f = ch02.EDM()
    sigmas = sigma_steps(discretization, num_steps).to(latents.device)
    wrong = wrong_image_percent(net)
    ref = reference(net, latents, float(sigmas[0]), reference_steps)
    x1 = heun(net, latents * sigmas[0], sigmas[:2], f)
    split = torch.cat([sigmas[:1], (sigmas[0] * sigmas[1]).sqrt()[None], sigmas[1:]])
    return dict(sigma_0=float(sigmas[0]), sigma_1=float(sigmas[1]),
                first_step_only=wrong(reference(net, x1 / sigmas[1], float(sigmas[1]), reference_steps), ref),
                whole_run=wrong(heun(net, latents * sigmas[0], sigmas, f), ref),
                first_step_split=wrong(heun(net, latents * sigmas[0], split, f), ref))


# ----------------------------------------------------------------------------
# Figures and tables.

def plot_discretizations(num_steps, file):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for disc in ("vp", "ve", "iddpm", "edm"):
        s = sigma_steps(disc, num_steps)[:-1]
        ax.semilogy(range(num_steps), s.numpy(), "o-", ms=3, color=COLOURS[disc], label=disc)
    for rho in (1, 3):
        ax.semilogy(range(num_steps), common.edm_sigma_steps(num_steps, rho=rho)[:-1].numpy(), "--", lw=1, label=f"edm, rho={rho}")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("step index i")
    ax.set_ylabel("noise level sigma_i (log scale)")
    iddpm = iddpm_sigma_steps(num_steps, *default_sigma_range("iddpm"))
    ax.set_title(f"Table 1 discretizations, N = {num_steps}: iDDPM's first step\n"
                 f"jumps {float(iddpm[0]):.1f} -> {float(iddpm[1]):.2f}; rho = 7 spends its steps at low sigma",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


COLOURS = {"vp": "tab:blue", "ve": "tab:orange", "iddpm": "tab:green", "edm": "tab:red"}


def plot_error_vs_nfe(panels, file, ylabel, log=True):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels.items()):
        for name, points in results.items():
            nfe, err = zip(*points)
            # One colour per discretization (grid) or formulation (ladder); Heun solid, Euler dashed and hollow.
            key = name.split(", ")[1].split()[0] if name.startswith(("euler", "heun")) else name.split()[0].lower()
            heun_like = "heun" in name or "EDM" in name
            ax.plot(nfe, err, "o-" if heun_like else "s--", ms=4 if heun_like else 5, color=COLOURS[key],
                    markerfacecolor=None if heun_like else "none", label=name)
        ax.set_xscale("log")
        ax.set_xticks(nfe, [str(n) for n in nfe])
        ax.minorticks_off()                      # log-axis minor labels ("3x10^1") would collide with these
        ax.set_yscale("log" if log else "linear")
        ax.set_xlabel("NFE (network evaluations per sample; equal for Euler and Heun)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2 if len(results) > 5 else 1, loc="lower left" if log else "upper right")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_local_errors(panels, file):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for rho, (sigmas, errors) in curves.items():
            ax.loglog(sigmas, [max(e, 1e-17) for e in errors], "o-", ms=3, label=f"rho = {rho}")
        ax.set_xlabel("noise level sigma_i at the start of the step")
        ax.set_ylabel("RMS error of one Heun step (data units)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Where Eq. 5's steps err: local error of each of N = 18 Heun steps, by rho "
                 "(exact steps drawn at 1e-17)", fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_samples(rows, reference_ids, net, file):
    """A labelled grid: one row per sampler, one column per latent; a red frame marks a sample that landed
    on another training image than the reference (first row)."""
    import matplotlib.pyplot as plt
    ncol = len(reference_ids)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.1 * ncol + 2.6, 1.15 * len(rows) + 0.6), squeeze=False)
    for r, (label, x) in enumerate(rows.items()):
        ids = net.nearest(x).cpu()
        pictures = common.to_uint8(x.float())
        for c in range(ncol):
            ax = axes[r, c]
            ax.imshow(pictures[c].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            wrong = bool(ids[c] != reference_ids[c])
            for spine in ax.spines.values():
                spine.set_edgecolor("red" if wrong else "0.8")
                spine.set_linewidth(3 if wrong else 0.5)
            if r == 0:
                ax.set_title(f"latent {c + 1}", fontsize=8)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Where each sampler carries the same 8 latents (red frame: another image than the reference)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def heun_ahead_from(results, discretizations=("vp", "ve", "iddpm", "edm")):
    """The smallest NFE from which on Heun's error is below Euler's on every one of `discretizations`
    (None if not even at the largest NFE measured)."""
    nfes = [n for n, _ in results["heun, edm steps"]]
    ahead = [all(dict(results[f"heun, {d} steps"])[n] < dict(results[f"euler, {d} steps"])[n] for d in discretizations)
             for n in nfes]
    return next((n for k, n in enumerate(nfes) if all(ahead[k:])), None)


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
    parser.add_argument("--images", type=common.number(int, low=2), default=256,
                        help="size of the finite image set (default: 256)")
    parser.add_argument("--latents", type=common.number(int, low=8), default=128,
                        help="image latents per configuration (default: 128)")
    parser.add_argument("--local-latents", type=positive, default=32,
                        help="latents for the per-step local error study (default: 32)")
    return parser.parse_args(argv)


def demo(args):
    device, outdir = common.start(__file__, args)
    torch.set_num_threads(1)  # small tensors run fastest without intra-op threads on a shared CPU
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
    toy4 = common.edm_sigma_steps(4).to(device)
    toy_damage = heun_step_damage(toy, toy_latents, toy4, common.rms)
    print("Why Heun loses to Euler on the toy at few NFE: Heun on EDM steps at 7 NFE, the error left when only one "
          "step is\nHeun's and the rest of the way exact. Past r = 2 a step extrapolates the change of D, and the "
          "toy's D keeps\nchanging down to sigma ~ 0.05 (its modes have std 0.25).")
    for i, err in enumerate(toy_damage[:-1]):
        r = float(toy4[i] / toy4[i + 1])
        print(f"  step {i + 1}: sigma {float(toy4[i]):6.2f} -> {float(toy4[i + 1]):<6.3f} r = {r:5.1f}, weight on "
              f"D's change (r-1)/2 = {heun_step_weights(r)[1]:5.1f}: error {err:.3f}")
    band = {}
    for disc in ("vp", "ve", "iddpm", "edm"):
        levels = sigma_steps(disc, 31)[:-1]
        band[disc] = (int(((levels >= 0.05) & (levels <= 3)).sum()), int((levels < 0.05).sum()))
    print("Euler at 31 NFE (31 steps): steps that start at sigma 0.05 - 3, where the toy's modes separate, and below "
          "0.05:\n  " + ", ".join(f"{d} {a} and {b}" for d, (a, b) in band.items()))
    print_table("Images: % of samples landing on another training image than a 128-step Heun reference "
                "(sigma(t) = t, s = 1)", grid_img, ".1f")

    # Why Heun on iDDPM steps does worse than Euler: its first step (heun_step_weights).
    studies = {(disc, n): first_step_study(image_net, image_latents, disc, n) for disc, n in
               (("iddpm", 16), ("iddpm", 32), ("edm", 16))}
    print(f"\nWhy Heun on iDDPM steps loses to Euler there: the first step. One Heun step from sigma_0 to "
          f"sigma_1 = sigma_0 / r\nmoves x toward D(sigma_1) with weight (r - 1)/2, the exact ODE by at most "
          f"1 - 1/r: past r = 2 Heun extrapolates.")
    print(f"{'Heun steps (NFE)':<22}{'sigma_0 -> sigma_1':>20}{'r':>6}{'(r-1)/2':>9}{'1-1/r':>7}"
          f"{'% on another image:':>22}{'1st step':>10}{'whole run':>11}{'1st split':>11}")
    for (disc, n), s in studies.items():
        r = s["sigma_0"] / s["sigma_1"]
        ode_weight, heun_weight = heun_step_weights(r)
        print(f"{disc + f', {n} ({2 * n - 1})':<22}{s['sigma_0']:>9.2f} -> {s['sigma_1']:<7.2f}{r:>6.1f}"
              f"{heun_weight:>9.2f}{ode_weight:>7.2f}{'':>22}{s['first_step_only']:>10.1f}{s['whole_run']:>11.1f}"
              f"{s['first_step_split']:>11.1f}")
    euler_iddpm = dict(grid_img["euler, iddpm steps"])
    print(f"(Euler on iDDPM steps at 31 NFE: {euler_iddpm[31]:.1f} %; its first step, 80.2 -> "
          f"{float(iddpm_sigma_steps(31, 0.002, 81)[1]):.1f}, only moves toward D(sigma_0), which it weights "
          f"1 - 1/r.)")

    print_table("Images, the paper's Fig. 2 ladders: % landing on another image", ladder, ".1f")
    ratios = {n: max(float(a / b) for a, b in zip(common.edm_sigma_steps(n)[:-2], common.edm_sigma_steps(n)[1:-1]) if a >= 0.5)
              for n in heun_steps[:4]}
    print("Heun in VE's coordinates (t = sigma^2) weights D's change by (r^2 - 1)/4, (r + 1)/2 times EDM's (r - 1)/2, "
          "for the\nsame noise levels. The longest of N EDM steps that start at sigma >= 0.5 (below, the images' D "
          "has settled):\n  "
          + "\n  ".join(f"N = {n} ({2 * n - 1} NFE): r = {r:.1f}, VE {heun_step_weight_ve(r):.1f} vs EDM "
                      f"{heun_step_weights(r)[1]:.1f}" for n, r in ratios.items()))
    toy_from, img_from = heun_ahead_from(grid_toy), heun_ahead_from(grid_img, ("vp", "ve", "edm"))
    plot_error_vs_nfe({f"1-D toy: Heun beats Euler on all four discretizations only from {toy_from} NFE": grid_toy},
                      f"{outdir}/error_vs_nfe_toy.png", "RMS error vs exact ODE solution (data units)")
    plot_error_vs_nfe({f"Images: Heun beats Euler from {img_from} NFE, except on iDDPM steps": grid_img,
                       "Images, Fig. 2 ladders: % on another image": ladder},
                      f"{outdir}/error_vs_nfe_images.png", "% of samples on another image than the reference",
                      log=False)

    # (2) Local truncation error per step vs sigma, for several rho (Eq. 5), N = 18.
    rhos = (1, 2, 3, 5, 7, 10)
    local, toy_global = {"1-D toy": {}, "images": {}}, {}
    print(f"\nEq. 5 with N = 18 Heun steps (35 NFE) and several rho: the worst single step, and the endpoint error")
    print(f"{'rho':>5}{'toy: worst local':>18}{'at sigma':>10}{'toy: global':>13}"
          f"{'img: worst local':>18}{'at sigma':>10}{'img: % wrong':>14}")
    for rho in rhos:
        sigmas = common.edm_sigma_steps(18, rho=rho).to(device)
        row = ""
        for title, net, lat, metric in (("1-D toy", toy, toy_latents, common.rms),
                                        ("images", image_net, image_latents, wrong)):
            err = np.array(local_errors(net, lat[:args.local_latents], sigmas))
            local[title][rho] = (sigmas[:-1].cpu().numpy(), err)
            x = make_sampler(18, rho=rho)(net, lat)
            worst = err.argmax()
            row += f"{err[worst]:>18.2e}{float(sigmas[worst]):>10.3f}"
            ref = reference(net, lat, 80.0, 256 if net is toy else 128)
            row += f"{metric(x, ref):>13.2e}" if net is toy else f"{metric(x, ref):>14.1f}"
            if net is toy:
                toy_global[rho] = metric(x, ref)
        print(f"{rho:>5}{row}")
    plot_local_errors(local, f"{outdir}/local_error_vs_sigma.png")

    # (3) Look at it: where the samplers of the tables carry the same 8 latents.
    latents8 = image_latents[:8]
    samplers = {"reference\n(Heun, 64 steps,\n127 NFE)": make_sampler(64),
                "Heun, EDM steps\n15 NFE": make_sampler(8),
                "Euler, EDM steps\n15 NFE": make_sampler(15, solver="euler"),
                "original VP sampler\n15 NFE": make_sampler(15, **LADDER["VP orig (euler, vp, vp/vp)"]),
                "Heun, iDDPM steps\n31 NFE": make_sampler(16, discretization="iddpm"),
                "Euler, iDDPM steps\n31 NFE": make_sampler(31, solver="euler", discretization="iddpm")}
    rows = {label: sample(image_net, latents8) for label, sample in samplers.items()}
    plot_samples(rows, image_net.nearest(next(iter(rows.values()))).cpu(), image_net, f"{outdir}/samples.png")

    def at(results, name, nfe):
        return dict(results[name])[nfe]
    discs = ("vp", "ve", "iddpm", "edm")
    toy_losses = {n: sum(at(grid_toy, f"heun, {d} steps", n) > at(grid_toy, f"euler, {d} steps", n) for d in discs)
                  for n in (7, 15)}
    heun_toy, euler_toy = (at(grid_toy, f"{solver}, edm steps", 63) / at(grid_toy, f"{solver}, edm steps", 127)
                           for solver in ("heun", "euler"))
    iddpm16 = studies[("iddpm", 16)]
    vp_ladder = [at(ladder, name, 31) for name in LADDER if "VE" not in name]
    print(f"""
What this shows (figures in {outdir}/, {time.time() - start:.0f} s)
  discretizations.png      the noise levels of Table 1 at N = 18: iDDPM's first step jumps, rho = 7 packs low sigma.
  error_vs_nfe_toy.png     Heun beats Euler on every discretization from {toy_from} NFE and falls {heun_toy:.1f}x per \
doubling (Euler {euler_toy:.1f}x),
                           but at 7 and 15 NFE it loses on {toy_losses[7]} and {toy_losses[15]} of 4: a step that more \
than halves sigma
                           extrapolates the change of D by (r - 1)/2, and the toy's D still changes there.
  error_vs_nfe_images.png  on images Heun wins from {img_from} NFE except on iDDPM's steps, whose first step alone \
(r = {iddpm16["sigma_0"] / iddpm16["sigma_1"]:.1f})
                           sends {iddpm16["first_step_only"]:.1f} % of samples elsewhere; Fig. 2's VP ladder at 31 NFE: \
{vp_ladder[0]:.1f} -> {vp_ladder[1]:.1f} -> {vp_ladder[2]:.1f} %.
  local_error_vs_sigma.png each Heun step's error peaks at sigma ~ 1-10; on the toy rho = 7 ends {toy_global[7]:.1e} \
from the ODE's
                           solution, rho = 2 {toy_global[2]:.1e} (App. D.1); samples.png shows where the samplers land.""")


def main(argv=None):
    common.run(demo, parse_args(argv))


if __name__ == "__main__":
    main()
