"""04 -- Stochastic sampling: EDM's churn sampler (Algorithm 2) and the SDE it improves on (Eq. 6).

EDM (Karras et al. 2022), Sec. 4. The probability-flow ODE of chapters 02-03 is not the only way down from
sigma_max to 0. Eq. 6 adds a Langevin term, which replaces noise at rate beta(t) and leaves every p(x; sigma) as is:

    dx = -sigma_dot sigma grad log p dt  -  beta(t) sigma^2 grad log p dt  +  sqrt(2 beta(t)) sigma dw      (Eq. 6)

Fresh noise lets the errors of earlier steps be forgotten, but an imperfect denoiser adds its own at every
replacement. Algorithm 2 splits the two: at each t_i it adds noise to climb to t_hat = (1 + gamma_i) t_i (S_churn:
how much; [S_min, S_max]: where; S_noise > 1 counters a denoiser that removes too much noise), then takes one Heun
step of the ODE down to t_{i+1}. Table 5: ImageNet-64 uses S_churn = 40, S_min = 0.05, S_max = 50, S_noise =
1.003; CIFAR-10 uses S_churn = 0, the ODE with Heun steps.
Run:  python 04_stochastic_sampler.py      (about 10 s on 2 CPU cores; figures in out/04_stochastic_sampler/)
"""

import torch

import common


# ----------------------------------------------------------------------------
# Algorithm 2, with sigma(t) = t and s(t) = 1.

def edm_sampler(net, x, sigmas, extra_args=None, randn_like=torch.randn_like,
                S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """Algorithm 2 from the noisy images x at t_0 = sigmas[0] through every t_i = sigmas[i] (Eq. 5 and t_N = 0:
    common.edm_sigma_steps); float64 images at sigma = 0. All randomness comes from `randn_like` (per seed:
    common.StackedRandomGenerator); `net.round_sigma` rounds t_hat where the network has one."""
    round_sigma = getattr(net, "round_sigma", lambda sigma: sigma)
    num_steps = len(sigmas) - 1
    gamma_max = min(S_churn / num_steps, 2 ** 0.5 - 1)          # churn per step, capped (line 4)
    x = x.to(torch.float64)                                          # line 1: x_0 ~ N(0, t_0^2 I)
    for i in range(num_steps):                                       # line 2
        t_i, t_next = sigmas[i], sigmas[i + 1]

        # Lines 3-6: add noise to climb from t_i to t_hat = (1 + gamma_i) t_i.
        gamma_i = gamma_max if S_min <= t_i <= S_max else 0
        t_hat = round_sigma(t_i + gamma_i * t_i)
        eps = S_noise * randn_like(x)
        x_hat = x + eps * (t_hat ** 2 - t_i ** 2).sqrt()

        # Lines 7-8: an Euler step of dx/dt = (x - D(x; t)) / t from t_hat down to t_{i+1}.
        h = t_next - t_hat
        d_i = (x_hat - common.denoise(net, x_hat, t_hat, extra_args)) / t_hat
        x_euler = x_hat + h * d_i

        # Lines 9-11: Heun's correction averages the slopes at both ends -- except on the
        # last step, where t_{i+1} = 0 and the slope there would divide by zero.
        if t_next > 0:
            d_prime = (x_euler - common.denoise(net, x_euler, t_next, extra_args)) / t_next
            x = x_hat + h * (d_i + d_prime) / 2
        else:
            x = x_euler
    return x                                                         # line 12


def make_sampler(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, **churn):
    """Algorithm 2 on Eq. 5's steps fitted to the network, as 08 and the demos take a sampler: sample(net, latents,
    extra_args, randn_like) from unit latents. Default: the paper's CIFAR-10 setting, 18 steps = 35 NFE, no churn."""
    def sample(net, latents, extra_args=None, randn_like=torch.randn_like):
        sigmas = common.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, net).to(latents.device)
        return edm_sampler(net, latents.to(torch.float64) * sigmas[0], sigmas, extra_args, randn_like, **churn)
    sample.settings = dict(function="edm_sampler", solver="heun", sigma_steps="edm",
                           options=dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, **churn))
    return sample


# ----------------------------------------------------------------------------
# The baseline: Euler-Maruyama for the reverse SDE of Eq. 6.

def sde_sampler(net, x, sigmas, extra_args=None, randn_like=torch.randn_like, beta=lambda t: 1 / t):
    """Euler-Maruyama for Eq. 6 with sigma(t) = t and the score (D - x) / t^2 (Eq. 3): a step dt < 0 moves x by
    (x - D)/t dt + beta (D - x) |dt| + sqrt(2 beta |dt|) t eps. beta = 1/t is Song et al.'s reverse SDE, beta = 0
    the ODE with Euler. The last step, to t = 0, is the ODE's: noise added there would stay in the image."""
    x = x.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = common.denoise(net, x, t_cur, extra_args)
        dt = t_next - t_cur
        x_next = x + (x - denoised) / t_cur * dt                                      # ODE drift
        if i < len(sigmas) - 2:
            b = beta(t_cur)
            x_next = x_next + b * (denoised - x) * dt.abs() + (2 * b * dt.abs()).sqrt() * t_cur * randn_like(x)
        x = x_next
    return x


# ----------------------------------------------------------------------------
# Demo: chapter 01's 1-D toy with its exact denoiser, and with one that removes too much noise.

class OverDenoiser:
    """`data`'s exact D, removing (1 + eps) times the noise at low sigma: D' = D - eps c(sigma) (x - D), where
    c = sigma_data / sqrt(sigma^2 + sigma_data^2) fades at high sigma as a preconditioned network's error (05)."""

    def __init__(self, data, eps, sigma_data=0.5):
        self.data, self.eps, self.sigma_data = data, eps, sigma_data

    def __call__(self, x, sigma, class_labels=None):
        denoised = self.data(x, sigma)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return denoised - self.eps * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt() * (x - denoised)


CHURNS = [0, 1, 2, 5, 10, 20, 40, 80]
NOISES = [1.0, 1.007, 1.02]


def churn_sweep(samples=8192, steps=64, eps=0.4, seed=0, device="cpu"):
    """(W1, right-mode weight, right-mode std) per denoiser, S_noise and S_churn, and for Euler-Maruyama at equal NFE;
    the noise floor of W1 (5th, 50th, 95th percentile of fresh data samples' W1 to the reference)."""
    ch01 = common.load("01_toy_1d")
    mix = ch01.default_mixture()
    nets = {"exact D": mix, "imperfect D": OverDenoiser(mix, eps)}
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(samples, 1, generator=g, dtype=torch.float64).to(device)
    truth = mix.sample(50000, g)
    floor = torch.tensor([ch01.wasserstein1(mix.sample(samples, g), truth) for _ in range(100)],
                         dtype=torch.float64).quantile(torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()

    def run(sampler, net, num_steps, **kwargs):   # every configuration sees the same noise stream
        sigmas, noise = common.edm_sigma_steps(num_steps).to(device), torch.Generator().manual_seed(seed + 1)
        x = sampler(net, latents * sigmas[0], sigmas, randn_like=lambda x: torch.randn(
            x.shape, generator=noise, dtype=x.dtype).to(x.device), **kwargs).cpu()
        return x, (ch01.wasserstein1(x, truth), float((x > 0).double().mean()), float(x[x > 0].std()))
    sweep = {(name, S_noise): [run(edm_sampler, net, steps, S_churn=c, S_noise=S_noise)[1] for c in CHURNS]
             for name, net in nets.items() for S_noise in NOISES}
    sde = {name: run(sde_sampler, net, 2 * steps - 1)[1] for name, net in nets.items()}
    hists = {c: run(edm_sampler, nets["imperfect D"], steps, S_churn=c)[0] for c in (0, 10, 80)}
    return dict(sweep=sweep, sde=sde, hists=hists, truth=truth, floor=floor, data=mix)


def plot(r, outdir):
    """w1_vs_churn.png: W1 against S_churn for both denoisers; histograms.png: the imperfect D's samples (01's plot)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name, title in zip(axes, ["exact D", "imperfect D"], ["Exact D: ODE and churn all within the noise floor",
                                                                 "D removing too much noise: churn and S_noise > 1 help"]):
        for S_noise in NOISES:
            ax.plot(CHURNS, [w1 for w1, _, _ in r["sweep"][(name, S_noise)]], "o-", ms=4, label=f"S_noise = {S_noise}")
        ax.axhspan(r["floor"][0], r["floor"][2], color="0.85", label="noise floor: data vs data, 5-95 %")
        ax.axhline(r["floor"][1], color="k", ls="--", lw=1, label="noise floor, median")
        ax.set_xscale("symlog", linthresh=1)
        ax.set(xlim=(0, 90), ylim=(0, None), xlabel="S_churn (0 = deterministic ODE)",
               ylabel="Wasserstein-1 distance to the data", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{outdir}/w1_vs_churn.png", dpi=120)
    common.load("01_toy_1d").plot_histograms(r["truth"], {f"imperfect D, S_churn = {c} (mode std {x[x > 0].std():.3f})": x
                                                          for c, x in r["hists"].items()}, f"{outdir}/histograms.png",
                                             "Churn re-widens the modes an over-denoising D makes too narrow (data: "
                                             f"mode std {float(r['data'].stds[1]):.3f})")
    plt.close("all")


def report(r, steps, eps, outdir):
    """The tables (W1 and the right mode's std per setting), then what the figures show, with this run's numbers."""
    at = lambda name, S_noise, S_churn: r["sweep"][(name, S_noise)][CHURNS.index(S_churn)]  # noqa: E731
    print(f"Algorithm 2, N = {steps} steps ({2 * steps - 1} NFE), S_min = 0, S_max = inf (gamma reaches its cap "
          f"sqrt(2) - 1 at S_churn = {(2 ** 0.5 - 1) * steps:.0f}); imperfect D: eps = {eps}; SDE: Euler-Maruyama "
          f"(Eq. 6) at {2 * steps - 1} NFE.\nNoise floor of W1: fresh data samples are {r['floor'][1]:.4f} from the "
          f"data, 90 % of the time {r['floor'][0]:.4f}-{r['floor'][2]:.4f}. Std of the data's right mode "
          f"{float(r['data'].stds[1]):.3f}.")
    for column, title in ((0, "Wasserstein-1 distance W1 to the data"), (2, "std within the right mode")):
        print(f"{title:<34}" + "".join(f"{c:>8}" for c in CHURNS) + f"{'SDE':>8}")
        for (name, S_noise), rows in r["sweep"].items():
            print(f"{f'  {name}, S_noise = {S_noise}':<34}" + "".join(f"{row[column]:>8.4f}" for row in rows)
                  + (f"{r['sde'][name][column]:>8.4f}" if S_noise == 1 else ""))
    ode, churned, noisier = at("imperfect D", 1.0, 0), at("imperfect D", 1.0, 10), at("imperfect D", 1.02, 10)
    print(f"""
What this shows (figures in {outdir}/)
  w1_vs_churn.png  a D that removes too much noise is far off with the ODE (W1 {ode[0]:.4f}); churn -- fresh noise
    that corrects earlier errors -- brings it to {churned[0]:.4f} at S_churn = 10, and S_noise = 1.02 to {noisier[0]:.4f}
    (Sec. 4, Table 5). The exact D's ODE is already within the noise floor: churn has nothing to correct.
  histograms.png   churn re-widens the imperfect D's too narrow modes (std {ode[2]:.3f} -> {churned[2]:.3f}). Euler-
    Maruyama corrects them too, but its first-order steps widen even the exact D's (std {r["sde"]["exact D"][2]:.3f}).""")


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    for flag, kind, default, what in [("--samples", common.number(int, low=2), 8192, "samples per configuration"),
                                      ("--steps", common.number(int, low=2), 64, "sampler steps N"),
                                      ("--eps", common.number(float, 0, 10), 0.4, "excess noise the imperfect D removes")]:
        parser.add_argument(flag, type=kind, default=default, help=f"{what} (default: {default})")
    return parser.parse_args(argv)


def demo(args):
    device, outdir = common.start(__file__, args)
    torch.set_num_threads(1)  # 1-D toy tensors are far too small for intra-op threads to pay off
    r = churn_sweep(args.samples, args.steps, args.eps, args.seed, device)
    plot(r, outdir)
    report(r, args.steps, args.eps, outdir)


def main(argv=None):
    common.run(demo, parse_args(argv))


if __name__ == "__main__":
    main()
