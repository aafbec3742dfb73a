"""04 -- Stochastic sampling: EDM's churn sampler (Algorithm 2) and the SDE it improves on (Eq. 6).

EDM (Karras et al. 2022), Sec. 4. The probability-flow ODE of chapters 02-03 is not the only
way down from sigma_max to 0. Eq. 6 adds a Langevin term to it,

    dx = -sigma_dot sigma grad log p dt  -  beta(t) sigma^2 grad log p dt  +  sqrt(2 beta(t)) sigma dw,     (Eq. 6)
         \\---- probability-flow ODE ---/    \\------- Langevin diffusion: replaces noise at rate beta -------/

which leaves every marginal p(x; sigma) unchanged for any beta(t) >= 0. Song et al.'s reverse
SDE is the case beta = sigma_dot / sigma, solved with Euler-Maruyama. The Langevin part keeps
replacing old noise with fresh noise, so errors made at earlier steps are gradually
forgotten -- but with an imperfect denoiser every replacement adds a little of its own error.

Algorithm 2 (the EDM sampler) separates the two parts instead of solving Eq. 6 directly:

    for i = 0 .. N-1:
        gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_min, S_max] else 0
        t_hat   = (1 + gamma_i) t_i                                  # raise the noise level ...
        x_hat   = x_i + sqrt(t_hat^2 - t_i^2) S_noise eps            # ... by adding fresh noise
        x_{i+1} = one Heun step of the ODE from (x_hat, t_hat) to t_{i+1} (Euler if t_{i+1} = 0)

S_churn sets the total amount of stochasticity, [S_min, S_max] the noise levels where it acts,
and S_noise slightly above 1 counteracts the denoiser's tendency to remove a bit too much
noise. For its retrained ImageNet-64 model the paper samples with 256 steps, S_churn = 40,
S_min = 0.05, S_max = 50, S_noise = 1.003 (Table 5; the official README's command); CIFAR-10,
FFHQ and AFHQ use S_churn = 0, i.e. the deterministic ODE with Heun's method.

The demo uses chapter 01's 1-D toy, once with its exact denoiser and once with a denoiser that
removes too much noise, and shows what churn does to the generated distribution. What it
finds (N = 64): with the exact denoiser the ODE is already right and churn only moves W1
within the sampling noise (large S_churn makes it slightly worse). With the imperfect one,
the ODE's modes come out too narrow -- the toy's "loss of detail" (std 0.16 instead of 0.25);
churn restores part of the width (0.19 at S_churn = 10), with the best W1 at moderate S_churn,
while excessive churn shifts the mode weights further off (0.734 -> 0.743 against 0.700) and
W1 rises again; S_noise > 1 helps by adding back some of the noise removed in excess. The
Euler-Maruyama SDE at the same NFE is twice as far off as the ODE with the exact denoiser;
on this toy it copes best with the imperfect one (the paper's Fig. 4 shows the SDE needing
far more steps on real images).

Run:  python 04_stochastic_sampler.py      (about 15 s on 2 CPU cores; figures in out/04_stochastic_sampler/)
"""

import math
import time

import numpy as np
import torch

import common

schedules = common.load("03_heun_and_schedules")


# ----------------------------------------------------------------------------
# Algorithm 2.

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
):
    """Algorithm 2 with sigma(t) = t, s(t) = 1: returns float64 samples at sigma = 0.

    `latents` are unit-variance; all randomness comes from `randn_like`, so with a per-seed
    generator (common.StackedRandomGenerator) each sample depends only on its own seed.
    """
    # The network may only support part of the range.
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    round_sigma = getattr(net, "round_sigma", lambda sigma: sigma)

    # Time steps t_0 .. t_{N-1} of Eq. 5 (times = noise levels here), and t_N = 0.
    t_steps = round_sigma(schedules.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    def D(x, t):                                       # the denoiser, evaluated in float64
        return net(x, t, class_labels).to(torch.float64)

    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)  # churn per step, capped (line 4)
    x = latents.to(torch.float64) * t_steps[0]                                     # line 1: x_0 ~ N(0, t_0^2 I)
    for i in range(num_steps):                                                      # line 2
        t_i, t_next = t_steps[i], t_steps[i + 1]

        # Lines 3-6: add noise to climb from t_i to t_hat = (1 + gamma_i) t_i.
        gamma_i = gamma_max if S_min <= t_i <= S_max else 0
        t_hat = round_sigma(t_i + gamma_i * t_i)
        eps = S_noise * randn_like(x)
        x_hat = x + eps * (t_hat ** 2 - t_i ** 2).sqrt()

        # Lines 7-8: an Euler step of dx/dt = (x - D(x; t)) / t from t_hat down to t_{i+1}.
        h = t_next - t_hat
        d_i = (x_hat - D(x_hat, t_hat)) / t_hat
        x_euler = x_hat + h * d_i

        # Lines 9-11: Heun's correction averages the slopes at both ends -- except on the
        # last step, where t_{i+1} = 0 and the slope there would divide by zero.
        if t_next > 0:
            d_prime = (x_euler - D(x_euler, t_next)) / t_next
            x = x_hat + h * (d_i + d_prime) / 2
        else:
            x = x_euler
    return x                                                                        # line 12


# ----------------------------------------------------------------------------
# The baseline: Euler-Maruyama for the reverse SDE of Eq. 6.

def sde_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
                num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, beta=lambda t: 1 / t):
    """Euler-Maruyama for Eq. 6 backwards in time, with sigma(t) = t and the score from D (Eq. 3).

    With grad log p = (D - x) / t^2, a step of dt = t_{i+1} - t_i < 0 moves x by
        (x - D)/t dt  +  beta(t) (D - x) |dt|  +  sqrt(2 beta(t) |dt|) t eps.
    beta = 1/t (= sigma_dot/sigma) is Song et al.'s reverse SDE; beta = 0 is the ODE with Euler.
    One NFE per step. The last step, to t = 0, is the plain ODE step (it lands on D), since
    fresh noise there could never be removed.
    """
    t_steps = schedules.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        denoised = net(x, t_cur, class_labels).to(torch.float64)
        dt = t_next - t_cur
        x_next = x + (x - denoised) / t_cur * dt                                      # ODE drift
        if i < num_steps - 1:
            b = beta(t_cur)
            x_next = x_next + b * (denoised - x) * dt.abs() + (2 * b * dt.abs()).sqrt() * t_cur * randn_like(x)
        x = x_next
    return x


# ----------------------------------------------------------------------------
# An imperfect denoiser for the demo.

class OverDenoiser:
    """The exact denoiser of `data`, made to remove slightly too much noise.

    D'(x; sigma) = D(x; sigma) - eps * sigma_data / sqrt(sigma^2 + sigma_data^2) * (x - D(x; sigma)):
    it takes (1 + eps) times the noise it estimates at low sigma. The factor fades at high
    sigma, where x is mostly noise and a real, preconditioned network's error stays bounded
    (its output scale is c_out, chapter 05), instead of growing with sigma.
    """

    def __init__(self, data, eps, sigma_data=0.5):
        self.data, self.eps, self.sigma_data = data, eps, sigma_data

    def __call__(self, x, sigma, class_labels=None):
        denoised = self.data(x, sigma)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return denoised - self.eps * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt() * (x - denoised)


# ----------------------------------------------------------------------------
# Demo.

def seeded_randn_like(seed):
    """A randn_like that draws from its own generator (so every configuration sees the same noise stream)."""
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)


def describe(toy, samples, truth):
    """W1 to the data, weight of the right mode, std within the right mode (the toy's 'detail')."""
    right = samples[samples > 0]
    return toy.wasserstein1(samples.cpu(), truth), float((samples > 0).double().mean()), float(right.std())


def plot_churn(churns, curves, file):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, w1 in curves.items():
        ax.plot(churns, w1, "o-", ms=4, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("S_churn")
    ax.set_ylabel("W1 to the data distribution")
    ax.set_title("Churn with an exact and an imperfect denoiser")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_histograms(truth, results, file):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), sharey=True)
    bins = np.linspace(-2, 2, 121)
    for ax, (name, samples) in zip(axes, results.items()):
        ax.hist(truth.flatten().numpy(), bins=bins, density=True, color="0.8", label="data")
        ax.hist(samples.flatten().cpu().numpy(), bins=bins, density=True, histtype="step", lw=1.5, label="generated")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main():
    parser = common.base_parser(__doc__)
    parser.add_argument("--samples", type=int, default=8192, help="samples per configuration (default: 8192)")
    parser.add_argument("--steps", type=int, default=64, help="sampler steps N (default: 64)")
    parser.add_argument("--eps", type=float, default=0.4,
                        help="how much too much noise the imperfect denoiser removes (default: 0.4)")
    args = parser.parse_args()
    if args.samples < 2 or args.steps < 2 or args.eps < 0:
        raise SystemExit("error: --samples and --steps must be >= 2, --eps >= 0")
    device = common.get_device(args.device)
    torch.set_num_threads(1)  # 1-D toy tensors are far too small for intra-op threads to pay off
    outdir = common.out_dir(__file__, args.outdir)
    common.seed_all(args.seed)
    start = time.time()

    toy = common.load("01_toy_1d")
    mix = toy.default_mixture()
    imperfect = f"D removing too much noise (eps={args.eps})"
    nets = {"exact D": mix, imperfect: OverDenoiser(mix, args.eps)}
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.samples, 1, generator=g, dtype=torch.float64).to(device)
    truth = mix.sample(50000, g)
    w1_floor = toy.wasserstein1(mix.sample(args.samples, g), truth)

    # (1) Sweep S_churn (and S_noise) with Algorithm 2.
    churns = [0, 1, 2, 5, 10, 20, 40, 80]
    noises = [1.0, 1.007, 1.02]
    curves, detail, hists = {}, {}, {}
    for net_name, net in nets.items():
        for S_noise in noises:
            results = [describe(toy, edm_sampler(net, latents, randn_like=seeded_randn_like(args.seed + 1),
                                                 num_steps=args.steps, S_churn=S_churn, S_noise=S_noise), truth)
                       for S_churn in churns]
            curves[f"{net_name}, S_noise={S_noise}"] = [w1 for w1, _, _ in results]
            if net is not mix and S_noise == 1.0:
                detail = results
    for S_churn in (0, 10, 80):
        hists[f"imperfect D, S_churn = {S_churn}"] = edm_sampler(
            nets[imperfect], latents, randn_like=seeded_randn_like(args.seed + 1), num_steps=args.steps,
            S_churn=S_churn)
    plot_churn(churns, curves, f"{outdir}/w1_vs_churn.png")
    plot_histograms(truth, hists, f"{outdir}/histograms.png")

    print(f"Algorithm 2, N = {args.steps} steps ({2 * args.steps - 1} NFE), S_min = 0, S_max = inf "
          f"(gamma reaches its cap sqrt(2) - 1 at S_churn = {(math.sqrt(2) - 1) * args.steps:.0f})")
    print(f"W1 to the data (sampling noise of {args.samples} samples: ~{w1_floor:.4f})")
    print(f"{'S_churn':<50}" + "".join(f"{c:>8}" for c in churns))
    for label, w1s in curves.items():
        print(f"{label:<50}" + "".join(f"{w:>8.4f}" for w in w1s))
    print(f"\n{imperfect}, S_noise = 1 (data: right-mode weight {float(mix.weights[1]):.3f}, "
          f"std within the mode {float(mix.stds[1]):.3f})")
    print(f"{'right-mode weight':<50}" + "".join(f"{wt:>8.3f}" for _, wt, _ in detail))
    print(f"{'std within the right mode (the detail)':<50}" + "".join(f"{sd:>8.3f}" for _, _, sd in detail))

    # (2) The SDE baseline (Euler-Maruyama, beta = 1/t) vs the ODE and Algorithm 2 at equal NFE.
    nfe = 2 * args.steps - 1
    rows = {
        "Euler-Maruyama SDE (Eq. 6, beta = 1/t)": lambda net: sde_sampler(
            net, latents, randn_like=seeded_randn_like(args.seed + 1), num_steps=nfe),
        "ODE, Heun (Algorithm 2, S_churn = 0)": lambda net: edm_sampler(net, latents, num_steps=args.steps),
        "Algorithm 2, S_churn = 10": lambda net: edm_sampler(
            net, latents, randn_like=seeded_randn_like(args.seed + 1), num_steps=args.steps, S_churn=10),
        "Algorithm 2, S_churn = 10, S_noise = 1.02": lambda net: edm_sampler(
            net, latents, randn_like=seeded_randn_like(args.seed + 1), num_steps=args.steps, S_churn=10,
            S_noise=1.02),
    }
    print(f"\nEqual cost, NFE = {nfe}: W1 / right-mode weight / std")
    print(f"{'sampler':<44}{'exact D':>24}{'imperfect D':>24}")
    for name, run in rows.items():
        cells = ["%.4f / %.3f / %.3f" % describe(toy, run(net), truth) for net in nets.values()]
        print(f"{name:<44}" + "".join(f"{c:>24}" for c in cells))
    print(f"\nfigures in {outdir}/  ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
