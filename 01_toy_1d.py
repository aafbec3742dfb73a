"""01 -- A 1-D toy where everything is exact: noised densities, score, denoiser, ODE and SDE.

EDM (Karras et al. 2022, Sec. 2) describes diffusion without any neural network in sight:
take the data distribution p_data(y), add i.i.d. Gaussian noise of standard deviation
sigma, and call the result p(x; sigma). Generation runs that in reverse: start from pure
noise at a huge sigma_max and follow a differential equation that lowers sigma to zero.

In one dimension, with data drawn from a mixture of two Gaussians, every quantity the
paper talks about has a closed form, so we can *see* it:

* the noised density   p(x; sigma) = p_data * N(0, sigma^2)         (Sec. 2, convolution)
  -- a mixture again, with each component's variance grown by sigma^2;
* the score            grad_x log p(x; sigma)
* the ideal denoiser   D(x; sigma) = E[y | x]                        (minimiser of Eq. 2)
  and the identity     grad_x log p(x; sigma) = (D(x; sigma) - x) / sigma^2        (Eq. 3)
  (Tweedie's formula: a denoiser *is* a score model);
* the probability-flow ODE, with sigma(t) = t (the paper's choice, Sec. 3):
      dx/dt = -sigma_dot(t) sigma(t) grad log p(x; sigma(t)) = (x - D(x; t)) / t      (Eq. 1)
  Its tangent at any point aims straight at the denoiser output D(x; t);
* the reverse-time SDE (Eq. 6 with beta(t) = sigma_dot/sigma):
      dx = -2 sigma_dot sigma grad log p dt + sqrt(2 sigma_dot sigma) dw
  i.e. the ODE's drift twice over plus fresh noise;
* the forward process: x(t) = y + noise whose variance grows like sigma(t)^2 -- a random
  walk (with sigma(t) = sqrt(t) it is literally dx = dw, pure white noise).

Finally we *learn* a denoiser D_theta(x; sigma) -- a small MLP trained with the denoising
loss E ||D(y + n; sigma) - y||^2 (Eq. 2) -- and compare it with the exact one, and sample
with both through the ODE and the SDE.

Run:  python 01_toy_1d.py            (about 30 s on 2 CPU cores; figures in out/01_toy_1d/)
"""

import math
import time

import torch

import common


# ----------------------------------------------------------------------------
# The data: a two-component Gaussian mixture, and everything it implies in closed form.

class GaussianMixture1D:
    """p_data(y) = sum_k w_k N(y; mu_k, s_k^2), with exact noised quantities.

    Every method takes x of any shape and sigma broadcastable to it. Calling the object,
    `mix(x, sigma)`, returns the exact denoiser, so it can stand in for a trained network
    in every sampler of the later chapters (`net(x, sigma, class_labels)`).
    """

    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()

    def _components(self, x, sigma):
        """Per-component log N(x; mu_k, s_k^2 + sigma^2) + log w_k, and the noised variances."""
        x = torch.as_tensor(x, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        var = self.stds.to(x.device) ** 2 + sigma[..., None] ** 2      # noise adds variance
        diff = x[..., None] - self.means.to(x.device)
        log_n = -0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var))
        return log_n + torch.log(self.weights.to(x.device)), var, diff

    def log_density(self, x, sigma):
        """log p(x; sigma): the data density convolved with N(0, sigma^2)."""
        log_joint, _, _ = self._components(x, sigma)
        return torch.logsumexp(log_joint, dim=-1)

    def density(self, x, sigma):
        return self.log_density(x, sigma).exp()

    def score(self, x, sigma):
        """grad_x log p(x; sigma) = sum_k r_k(x) (mu_k - x) / (s_k^2 + sigma^2)."""
        log_joint, var, diff = self._components(x, sigma)
        r = torch.softmax(log_joint, dim=-1)                            # responsibilities
        return (r * -diff / var).sum(-1)

    def denoise(self, x, sigma):
        """D(x; sigma) = E[y | x]: each component's Wiener estimate, weighted by responsibility."""
        log_joint, var, diff = self._components(x, sigma)
        r = torch.softmax(log_joint, dim=-1)
        posterior_means = self.means.to(diff.device) + self.stds.to(diff.device) ** 2 / var * diff
        return (r * posterior_means).sum(-1)

    def __call__(self, x, sigma, class_labels=None):
        return self.denoise(x, sigma)

    def sample(self, n, generator=None):
        """n draws from p_data, shape [n, 1]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z)[:, None]


def default_mixture():
    """The toy of every chapter: two unequal, well-separated modes (std of the data ~ 0.96)."""
    return GaussianMixture1D(weights=[0.3, 0.7], means=[-1.0, 1.0], stds=[0.25, 0.25])


def wasserstein1(a, b):
    """Wasserstein-1 distance between two 1-D sample sets: the area between their empirical CDFs."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten().sort().values
    b = torch.as_tensor(b, dtype=torch.float64).flatten().sort().values
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a, grid[:-1], right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid[:-1], right=True) / len(b)
    return float(((cdf_a - cdf_b).abs() * grid.diff()).sum())


def mode_weight(samples, threshold=0.0):
    """Fraction of samples in the right-hand mode (right of the valley between the modes)."""
    return float((torch.as_tensor(samples) > threshold).double().mean())


# ----------------------------------------------------------------------------
# The forward process and the two reverse processes, with sigma(t) = t. The samplers start from x at
# t[0] and step through every t[i] (in the demo: Eq. 5's noise levels, common.edm_sigma_steps, then 0).

def forward_paths(y, t, generator=None):
    """Random-walk paths x(t) = y + n(t), Var n(t) = sigma(t)^2 = t^2, on an increasing grid t.

    Independent Gaussian increments of variance t_{i+1}^2 - t_i^2 make this the forward SDE
    dx = sqrt(2 sigma_dot sigma) dw (Eq. 6 with beta = 0), sampled exactly.
    """
    var_increments = (t[1:] ** 2 - t[:-1] ** 2).clamp(min=0)
    z = torch.randn(len(y), len(t) - 1, generator=generator, dtype=torch.float64)
    steps = z * var_increments.sqrt()
    start = y.reshape(-1, 1) + t[0] * torch.randn(len(y), 1, generator=generator, dtype=torch.float64)
    return torch.cat([start, start + steps.cumsum(dim=1)], dim=1)


def ode_sample(D, x, t):
    """Euler steps of the probability-flow ODE dx/dt = (x - D(x; t)) / t (Eq. 1, sigma(t) = t).

    `t` decreases to 0; the last step lands exactly on D(x; t_{N-1}). Returns the whole path [N+1, ...].
    """
    path = [x]
    for t_cur, t_next in zip(t[:-1], t[1:]):
        d = (x - D(x, t_cur)) / t_cur                 # the tangent points at the denoiser output
        x = x + (t_next - t_cur) * d
        path.append(x)
    return torch.stack(path)


def sde_sample(D, x, t, generator=None):
    """Euler-Maruyama for the reverse SDE dx = -2 t grad log p dt + sqrt(2t) dw (Eq. 6, beta = 1/t).

    With grad log p = (D - x)/t^2 (Eq. 3) a step from t_cur to t_next < t_cur moves x by
    2 (t_cur - t_next)/t_cur (D - x) -- twice the ODE's pull -- and adds noise of variance
    2 t_cur (t_cur - t_next). The final step to t = 0 is taken by the denoiser itself
    (an Euler step of the ODE), since a noise step there would be all overshoot.
    """
    path = [x]
    for t_cur, t_next in zip(t[:-2], t[1:-1]):
        dt = t_cur - t_next
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x + 2 * dt / t_cur * (D(x, t_cur) - x) + (2 * t_cur * dt).sqrt() * z
        path.append(x)
    path.append(D(x, t[-2]))
    return torch.stack(path)


# ----------------------------------------------------------------------------
# Learning a denoiser with the denoising loss (Eq. 2).

def mlp(fan_in, fan_out, width=128, depth=3):
    """The small MLP of the toy chapters: `depth` SiLU layers of `width` units, then a linear output."""
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(fan_in, width), torch.nn.SiLU()]
        fan_in = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(fan_in, fan_out))


class MLPDenoiser(torch.nn.Module):
    """D_theta(x; sigma) = x - sigma * F_theta(x / sqrt(1 + sigma^2), ln(sigma) / 4).

    Two small design choices keep a plain MLP trainable over sigma in [0.002, 80]:
    the input is divided by its expected scale, so it stays O(1) at every sigma, and the MLP
    F predicts the *noise* (as DDPM does) rather than the clean value, so at low sigma a
    small error in F is only a tiny error in D. Chapter 05 turns these tricks into EDM's
    principled preconditioning (c_in, c_skip, c_out, c_noise).
    """

    def __init__(self):
        super().__init__()
        self.net = mlp(2, 1)

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape)
        features = torch.stack([x / (1 + sigma ** 2).sqrt(), sigma.log() / 4], dim=-1)
        return x - sigma * self.net(features.float()).squeeze(-1).to(x.dtype)


class ToyMLP(torch.nn.Module):
    """F(x_in, noise_labels): the same MLP as a raw network for points [N, C], called like chapter 06's
    U-Nets, for chapter 05 to wrap in each preconditioning of its Table 1.

    The noise label enters through the sinusoidal embedding (frequencies 1 ... 1/10000) that DDPM++
    and ADM use, so one network serves every c_noise convention, from ln(sigma)/4 in [-1.6, 1.1] to a
    DDPM timestep in [0, 999] (a raw input that large would swamp the MLP).
    """

    def __init__(self, in_channels=1, out_channels=1, noise_channels=32, max_positions=10000):
        super().__init__()
        half = noise_channels // 2
        self.register_buffer("freqs", (1 / max_positions) ** (torch.arange(half) / half), persistent=False)
        self.net = mlp(in_channels + noise_channels, out_channels)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        angles = noise_labels.to(torch.float32)[:, None] * self.freqs[None, :]
        emb = torch.cat([angles.cos(), angles.sin()], dim=1).expand(x.shape[0], -1)
        return self.net(torch.cat([x.to(torch.float32), emb], dim=1)).to(x.dtype)


def sample_sigma(n, generator=None, P_mean=-1.2, P_std=1.2):
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2), EDM's choice (Table 1)."""
    return (P_mean + P_std * torch.randn(n, 1, generator=generator, dtype=torch.float64)).exp()


def denoising_error(D, y, sigma, n):
    """The squared error inside Eq. 2, |D(y + sigma n; sigma) - y|^2, for given data y [N, 1], noise
    levels sigma and unit noise n; its mean over y ~ p_data, sigma, n is the denoising loss."""
    return (D(y + sigma * n, sigma) - y) ** 2


def toy_loss(D, y):
    """Eq. 2 with sigma ~ sample_sigma and fresh noise, per sample (the call convention of chapter 05's losses)."""
    sigma = sample_sigma(len(y)).to(y.device, y.dtype)
    return denoising_error(D, y, sigma, torch.randn_like(y))


def train_toy(D, mix, loss_fn, steps, batch, lr, seed, device="cpu", log_every=0):
    """Adam with a cosine-decayed learning rate, fresh samples of `mix` every step, minimizing the mean of
    loss_fn(D, y). Returns D in eval mode and the loss of every step. Chapter 05 trains with it too."""
    torch.manual_seed(seed)                     # the noise the loss draws
    g = torch.Generator().manual_seed(seed)     # the data
    D.train().to(device)
    opt = torch.optim.Adam(D.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    for step in range(steps):
        y = mix.sample(batch, g).to(device, torch.float32)
        loss = loss_fn(D, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            # One batch's loss scatters by ~0.015 (sigma is drawn per example), so the log shows the mean since
            # the last line: a single batch can look like a rise where the loss has in fact levelled off.
            first = step - (step - 1) % log_every if step else 0
            print(f"  steps {first:5d}-{step:<5d} mean loss {sum(history[first:]) / len(history[first:]):.4f}")
    return D.eval(), history


def train_mlp(mix, steps=3000, batch=1024, lr=3e-3, seed=0, device="cpu", log_every=500):
    """An MLPDenoiser fitted to the mixture with the denoising loss (toy_loss)."""
    torch.manual_seed(seed)                     # the initial weights
    return train_toy(MLPDenoiser(), mix, toy_loss, steps, batch, lr, seed, device, log_every)[0]


# ----------------------------------------------------------------------------
# The demo's measurements and figures.

def generate(denoisers, x_T, t, seed):
    """{"ODE, <name> D": samples, "SDE, <name> D": samples} at sigma = 0 for each denoiser, all from x_T."""
    results = {}
    with torch.no_grad():
        for name, D in denoisers.items():
            results[f"ODE, {name} D"] = ode_sample(D, x_T, t)[-1].cpu()
            results[f"SDE, {name} D"] = sde_sample(D, x_T, t, torch.Generator().manual_seed(seed))[-1].cpu()
    return results


def held_out_loss(denoisers, mix, n, seed, device):
    """{name: Eq. 2's loss} on n fresh examples (data, sigma ~ sample_sigma, noise), the same for every denoiser."""
    g = torch.Generator().manual_seed(seed)
    y, sigma = mix.sample(n, g), sample_sigma(n, g)
    noise = torch.randn(y.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return {name: float(denoising_error(D, y.to(device), sigma.to(device), noise.to(device)).mean())
                for name, D in denoisers.items()}


SHOWN_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)   # the noise levels of denoisers.png


def denoiser_gap(mix, model, device, sigmas=SHOWN_SIGMAS):
    """Largest |D_learned - D_exact| over x in [-2, 2] at the noise levels of denoisers.png."""
    x = torch.linspace(-2, 2, 401, dtype=torch.float64)
    with torch.no_grad():
        return max(float((model(x.to(device), torch.tensor(s, dtype=torch.float64, device=device)).cpu()
                          - mix.denoise(x, s)).abs().max()) for s in sigmas)


def plot_density_paths(mix, paths, t_grid, path_t, title, file):
    """Heat map of p(x; sigma = t) over (t, x) with sample paths on top."""
    import matplotlib.pyplot as plt
    x = torch.linspace(-4, 4, 400, dtype=torch.float64)
    tt = t_grid.clamp(min=1e-3)
    dens = mix.density(x[None, :], tt[:, None])              # [T, X]
    dens = dens / dens.max(dim=1, keepdim=True).values      # per-t normalisation shows the shape at every t
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.imshow(dens.T.numpy(), origin="lower", aspect="auto", cmap="magma",
              extent=[float(t_grid[0]), float(t_grid[-1]), -4, 4])
    for p in paths:
        ax.plot(path_t.numpy(), p.numpy(), color="cyan", lw=0.7, alpha=0.8)
    ax.set_xlabel("time t = noise level sigma (data units)")
    ax.set_ylabel("x (data units)")
    ax.set_ylim(-4, 4)
    ax.set_xlim(float(t_grid[0]), float(t_grid[-1]))
    ax.set_title(f"{title}\nbackground: p(x; sigma = t), scaled to 1 at its peak at each t", fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_denoisers(mix, model, file, device):
    import matplotlib.pyplot as plt
    x = torch.linspace(-3, 3, 300, dtype=torch.float64)
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharex=True)
    for ax, s in zip(axes.flat, SHOWN_SIGMAS):
        with torch.no_grad():
            learned = model(x.to(device), torch.tensor(s, dtype=torch.float64, device=device)).cpu()
        ax.plot(x, x, color="0.7", lw=1, ls=":", label="identity")
        ax.plot(x, mix.denoise(x, s), color="k", lw=2, label="exact D(x; sigma)")
        ax.plot(x, learned, color="tab:orange", lw=1.5, ls="--", label="learned MLP")
        ax.set_title(f"sigma = {s}")
        ax.set_ylim(-2, 2)
    for ax in axes[1]:
        ax.set_xlabel("noisy input x (data units)")
    for ax in axes[:, 0]:
        ax.set_ylabel("denoised output D(x; sigma)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Exact vs learned denoiser (Eq. 2): at low sigma D ~ x, at high sigma D ~ the data mean")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_histograms(truth, results, file, title):
    """One panel per sample set: its histogram over the data's, titled with its W1 to the data (04 plots with it too)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.8), sharey=True)
    bins = torch.linspace(-2.5, 2.5, 101).numpy()
    for ax, (name, samples) in zip(axes, results.items()):
        ax.hist(truth.flatten().numpy(), bins=bins, density=True, color="0.8", label="data")
        ax.hist(samples.flatten().numpy(), bins=bins, density=True, histtype="step", color="tab:blue", lw=1.5,
                label="generated")
        ax.set_title(f"{name}\nWasserstein-1 distance to data {wasserstein1(truth, samples):.4f}", fontsize=10)
        ax.set_xlabel("sample value x (data units)")
    axes[0].set_ylabel("probability density")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--samples", type=common.number(int, low=2), default=20000,
                        help="samples per generated set (default: 20000)")
    parser.add_argument("--steps", type=common.number(int, low=2), default=256,
                        help="ODE/SDE steps from sigma=80 to 0 (default: 256)")
    parser.add_argument("--train-steps", type=common.number(int, low=1), default=3000,
                        help="MLP training steps (default: 3000)")
    return parser.parse_args(argv)


def demo(args):
    device, outdir = common.start(__file__, args)
    g = torch.Generator().manual_seed(args.seed)
    mix = default_mixture()
    start = time.time()

    # 1. The forward process: noise blurs the two modes into one broad Gaussian.
    t_fwd = torch.linspace(0, 3, 301, dtype=torch.float64)
    paths = forward_paths(mix.sample(24, g)[:, 0], t_fwd, g)
    plot_density_paths(mix, paths, t_fwd, t_fwd, "Forward process: p(x; sigma = t) and random-walk paths",
                       f"{outdir}/forward_paths.png")

    # 2. The probability-flow ODE backwards from t = 3, from evenly spaced starting points.
    t_rev = torch.linspace(3, 0, 301, dtype=torch.float64)
    x_start = torch.linspace(-3.5, 3.5, 29, dtype=torch.float64)
    flow = ode_sample(mix, x_start, t_rev)
    plot_density_paths(mix, flow.T, t_fwd, t_rev, "Probability-flow ODE (Eq. 1): deterministic flow lines",
                       f"{outdir}/ode_flow.png")
    sde = sde_sample(mix, x_start[::2], t_rev, g)
    plot_density_paths(mix, sde.T, t_fwd, t_rev, "Reverse SDE (Eq. 6): the same endpoints, noisy paths",
                       f"{outdir}/sde_paths.png")

    # 3. Learn a denoiser with the denoising loss, and compare it with the exact one.
    print(f"training an MLP denoiser for {args.train_steps} steps on {device} ...")
    model = train_mlp(mix, steps=args.train_steps, seed=args.seed, device=device)
    losses = held_out_loss({"learned": model, "exact": mix}, mix, 200_000, args.seed + 2, device)
    print(f"Eq. 2's loss on 200000 fresh examples: learned D {losses['learned']:.4f}, exact D {losses['exact']:.4f} "
          f"(the irreducible part)")
    plot_denoisers(mix, model, f"{outdir}/denoisers.png", device)

    # 4. Generate with ODE and SDE, exact and learned denoisers, from sigma_max = 80.
    t = common.edm_sigma_steps(args.steps).to(device)       # Eq. 5 (chapter 03 explains rho = 7), then 0
    truth = mix.sample(args.samples, g)
    x_T = (torch.randn(args.samples, 1, generator=g, dtype=torch.float64) * t[0]).to(device)
    results = generate({"exact": mix, "learned": model}, x_T, t, seed=args.seed + 1)
    plot_histograms(truth, results, f"{outdir}/histograms.png",
                    "Samples from sigma = 80 to 0 against the data: ODE (Eq. 1) and SDE (Eq. 6), exact and learned D")

    floor = wasserstein1(truth, mix.sample(args.samples, g))
    w1 = {name: wasserstein1(truth, samples) for name, samples in results.items()}
    print(f"\n{'sampler':<18}{'Wasserstein-1 distance (W1) to data':>38}{'right-mode weight':>20}")
    print(f"{'data (reference)':<18}{floor:>38.4f}{mode_weight(truth):>20.3f}   "
          f"(W1 between two data draws: the noise floor)")
    for name, samples in results.items():
        print(f"{name:<18}{w1[name]:>38.4f}{mode_weight(samples):>20.3f}")
    print(f"true right-mode weight: {float(mix.weights[1]):.3f}")

    right = int((flow[-1] > 0).sum())
    costlier = "SDE more than the ODE" if w1["SDE, learned D"] > w1["ODE, learned D"] else "ODE more than the SDE"
    print(f"""
What this shows (figures in {outdir}/, {time.time() - start:.0f} s)
  forward_paths.png  noise of std sigma = t blurs the two modes into one broad Gaussian; each path is a random walk.
  ode_flow.png       the probability-flow ODE (Eq. 1) backwards from t = 3: flow lines that never cross; {right} of \
{len(x_start)}
                     evenly spaced starts end in the heavier right mode. sde_paths.png: the reverse SDE (Eq. 6), noisy
                     paths to the same distribution.
  denoisers.png      the exact D(x; sigma) = E[y | x] (Eq. 2's minimiser) and the MLP trained on Eq. 2: at most \
{denoiser_gap(mix, model, device):.3f} apart for |x| < 2
                     at the noise levels shown.
  histograms.png     with the exact D, ODE and SDE come close to the data (W1 {w1["ODE, exact D"]:.4f}, {w1["SDE, exact D"]:.4f}; \
data vs data {floor:.4f}):
                     a denoiser is all a sampler needs (Eq. 3). With the learned D, W1 is {w1["ODE, learned D"] / w1["ODE, exact D"]:.0f} \
(ODE) and {w1["SDE, learned D"] / w1["SDE, exact D"]:.0f} (SDE) times larger, though its loss is
                     only {losses["learned"] - losses["exact"]:.4f} above the irreducible {losses["exact"]:.4f}; the \
same errors cost the {costlier}.""")


def main(argv=None):
    common.run(demo, parse_args(argv))


if __name__ == "__main__":
    main()
