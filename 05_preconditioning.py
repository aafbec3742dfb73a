"""05 -- Preconditioning and training: the network and training rows of Table 1.

Sec. 5 of the paper (Eq. 7-8, Table 1, Appendix B.6). Chapters 01-04 assumed an
ideal denoiser D(x; sigma). In practice D is a neural network, and how the raw
network F_theta is wrapped and trained matters as much as the sampler. EDM writes
every method in one form (Eq. 7):

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))

and trains it with the lambda-weighted denoising loss of Sec. 5,

    E_{sigma ~ p_train, y ~ p_data, n ~ N(0, sigma^2 I)} [ lambda(sigma) * |D(y + n; sigma) - y|^2 ],

which, substituting Eq. 7, is a plain regression of F onto an *effective target* (Eq. 8):

    lambda(sigma) c_out(sigma)^2 * | F(c_in (y + n); c_noise) - (y - c_skip (y + n)) / c_out |^2 .

Table 1 lists the four choices this file implements (sd = sigma_data, s = sigma):

             c_skip(s)          c_out(s)               c_in(s)              c_noise(s)
    VP       1                  -s                     1/sqrt(s^2 + 1)      (M - 1) t(s), t = sigma^-1
    VE       1                  s                      1                    ln(s / 2)
    iDDPM    1                  -s                     1/sqrt(s^2 + 1)      M - 1 - argmin_j |u_j - s|
    EDM      sd^2/(s^2 + sd^2)  s sd/sqrt(s^2 + sd^2)  1/sqrt(s^2 + sd^2)   ln(s) / 4

             p_train(sigma)                             lambda(sigma)
    VP       sigma = sigma(t), t ~ U(eps_t, 1)          1/sigma^2
    VE       ln sigma ~ U(ln sigma_min, ln sigma_max)   1/sigma^2
    iDDPM    sigma = u_j, j ~ U{0, ..., M-1}            1/sigma^2  (iDDPM adds an L_vlb term; not used)
    EDM      ln sigma ~ N(P_mean, P_std^2)              (sigma^2 + sd^2) / (sigma sd)^2

Why EDM's column (Appendix B.6): for data of standard deviation sigma_data,
  * c_in makes the network input c_in (y + n) unit variance at every sigma;
  * c_out makes the effective target unit variance, and c_skip is the choice that
    minimizes c_out, so the network's errors are amplified as little as possible;
  * lambda = 1/c_out^2 makes the effective weight lambda c_out^2 = 1 at every sigma.
VP, VE and iDDPM predict the noise n/sigma (c_skip = 1, c_out = +-sigma): at large
sigma the output must cancel almost all of x and any error in F is multiplied by sigma.

The preconditioners wrap any raw network `model(x_in, noise_labels, class_labels=None,
**kwargs)` (chapter 06 supplies the U-Nets) and store it as `self.model`, so their
state-dict keys are `model.*` (and `u` for iDDPM) exactly as in the official
checkpoints; their float32/float64 handling follows the official implementation,
so a checkpoint gives the same outputs to float32 rounding.

Run `python 05_preconditioning.py` (about 1.5 minutes on one CPU core): it prints the
unit-variance property numerically, plots c_skip/c_out/c_in/c_noise against sigma
(scalings.png), trains one small MLP on chapter 01's 1-D toy under each preconditioning
and loss with the same budget (two seeds), and compares the loss and the distance to the
exact denoiser per noise level (loss_per_sigma.png) and sample quality (W1, with chapter
04's EDM sampler; samples.png).

What it shows on the toy (data std 0.95, used as sigma_data): EDM's input and target have
unit variance at every sigma, VE's input variance grows like sigma^2 (VP and iDDPM assume
unit-std data, nearly true here). After training, EDM's denoiser is about 10x closer to the
exact one (lambda_EDM E|D - D*|^2 averaged over sigma: 0.018 vs 0.17-0.81), mostly because
the 1/sigma^2 losses barely train sigma > 5 and c_out = sigma amplifies what is left; it is
also closest at low and mid sigma. Its samples have the lowest mean W1 (0.018 vs 0.023 for
VP, 0.029 iDDPM, 0.040 VE), but the gap to VP is within the seed-to-seed spread: in 1-D the
probability-flow ODE shrinks errors made at high sigma, so they cost little in samples.
"""

import time

import numpy as np
import torch

import common

# ----------------------------------------------------------------------------
# Shared pieces of Table 1.

def vp_sigma(t, beta_d, beta_min):
    """VP noise level at time t: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (Table 1)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d, beta_min):
    """The inverse t(sigma) of vp_sigma: solves the quadratic beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2)."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


def iddpm_alpha_bar(j, M, C_2):
    """iDDPM's cosine schedule alpha_bar_j = sin^2(pi/2 * j / (M (C_2 + 1))) (Table 1)."""
    j = torch.as_tensor(j)
    return (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2


def iddpm_u_table(M, C_1, C_2):
    """The M+1 discrete noise levels u_0 > u_1 > ... > u_M = 0 of iDDPM (Table 1).

    Going backwards from u_M = 0: u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar_{j-1} / alpha_bar_j, C_1) - 1).
    Computed in float32, step by step, as the official code does (the checkpoints'
    noise labels are indices into exactly this table).
    """
    u = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        ratio = iddpm_alpha_bar(j - 1, M, C_2) / iddpm_alpha_bar(j, M, C_2)
        u[j - 1] = ((u[j] ** 2 + 1) / ratio.clip(min=C_1) - 1).sqrt()
    return u


def sigma_column(sigma, x):
    """sigma (python number, 0-d, [N] or [N, 1, ...]) as a float32 column [N or 1, 1, ..., 1] that broadcasts
    against x. A single sigma stays a single value, so the network embeds it once for the whole batch."""
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
    return sigma.reshape(-1, *[1] * (x.ndim - 1))


# ----------------------------------------------------------------------------
# Preconditioners: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7).

class Precond(torch.nn.Module):
    """What the four preconditioners share; each subclass supplies its column of Table 1 (`scalings`)."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False):
        super().__init__()
        self.model = model                    # the raw network F (state-dict keys "model.*")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim            # 0 = unconditional
        self.use_fp16 = use_fp16              # run F in float16 (on CUDA only)

    def scalings(self, sigma):
        """c_skip, c_out, c_in, c_noise for a float32 sigma; the rows of Table 1."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """The noise level the network actually supports closest to sigma (identity unless discrete)."""
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma_column(sigma, x)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32

        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        # iDDPM's network also predicts variances in a second half of channels; D uses the first half.
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)  # Eq. 7


class VPPrecond(Precond):
    """Variance preserving (Song et al. 2021, DDPM++): predicts the noise n/sigma; c_noise is the DDPM timestep."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d          # extent of the noise schedule
        self.beta_min = beta_min      # initial slope of the noise schedule
        self.M = M                    # number of DDPM timesteps the labels are scaled to
        self.epsilon_t = epsilon_t    # smallest t used in training
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def scalings(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Precond):
    """Variance exploding (Song et al. 2021, NCSN++): the input is not scaled at all; c_noise = ln(sigma/2)."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def scalings(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class iDDPMPrecond(Precond):
    """Improved DDPM (Nichol & Dhariwal 2021, ADM): a discrete table of M noise levels u_j; c_noise = M-1-j."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 C_1=0.001, C_2=0.008, M=1000):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1    # clamp on alpha_bar ratios (keeps the largest u_j finite)
        self.C_2 = C_2    # offset of the cosine schedule at high noise
        self.M = M        # number of timesteps
        self.register_buffer("u", iddpm_u_table(M, C_1, C_2))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def round_sigma(self, sigma, return_index=False):
        """Snap sigma to the nearest u_j (or return j). Uses torch.cdist as the official code does,
        so ties between two table entries resolve identically."""
        sigma = torch.as_tensor(sigma)
        distance = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = distance.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def scalings(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise


class EDMPrecond(Precond):
    """EDM (Sec. 5, Appendix B.6): unit-variance input and effective target, c_skip minimizing c_out."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float("inf"), sigma_data=0.5):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data  # standard deviation of the training data

    def scalings(self, sigma):
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


# ----------------------------------------------------------------------------
# Training losses: lambda(sigma) |D(y + n; sigma) - y|^2 with sigma ~ p_train (Table 1).
# Each returns the per-element loss; the training loop sums or averages it.

def column(values, images):
    """Shape [N] -> [N, 1, ..., 1] to broadcast against a batch of images."""
    return values.reshape(-1, *[1] * (images.ndim - 1))


def denoising_loss(net, images, labels, augment_pipe, sigma, weight):
    """lambda(sigma) |D(y + n; sigma) - y|^2 for a drawn sigma (Eq. 2 weighted as in Sec. 5).

    With an augment_pipe the clean images are augmented first; the pipe's labels tell
    the network which augmentation it sees (Appendix C.4), and D must undo only the noise.
    """
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


class VPLoss:
    """sigma = sigma(t), t ~ U(epsilon_t, 1); lambda = 1/sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = column(torch.rand([images.shape[0]], device=images.device), images)
        sigma = vp_sigma(1 + rnd_uniform * (self.epsilon_t - 1), self.beta_d, self.beta_min)
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

    def weight(self, sigma):
        return 1 / sigma ** 2


class VELoss:
    """ln sigma ~ U(ln sigma_min, ln sigma_max); lambda = 1/sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = column(torch.rand([images.shape[0]], device=images.device), images)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

    def weight(self, sigma):
        return 1 / sigma ** 2


class iDDPMLoss:
    """sigma = u_j, j ~ U{0, ..., M-1}; lambda = 1/sigma^2 (iDDPM's extra L_vlb term is left out, as in Table 1)."""

    def __init__(self, C_1=0.001, C_2=0.008, M=1000):
        self.u = iddpm_u_table(M, C_1, C_2)
        self.M = M

    def __call__(self, net, images, labels=None, augment_pipe=None):
        j = torch.randint(self.M, [images.shape[0]], device=images.device)
        sigma = column(self.u.to(images.device)[j], images)
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

    def weight(self, sigma):
        return 1 / sigma ** 2


class EDMLoss:
    """ln sigma ~ N(P_mean, P_std^2); lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = column(torch.randn([images.shape[0]], device=images.device), images)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


# ----------------------------------------------------------------------------
# The demo's raw network: a small MLP with the official call convention.

class ToyMLP(torch.nn.Module):
    """F(x_in, noise_labels): a small MLP for points of shape [N, C], called like the U-Nets of chapter 06.

    The noise label enters through the sinusoidal embedding (frequencies 1 ... 1/10000) that
    DDPM++ and ADM use (NCSN++ uses random Fourier features instead), so the one network serves
    all four c_noise conventions, from ln(sigma)/4 in [-1.6, 1.1] to a DDPM timestep in [0, 999].
    """

    def __init__(self, in_channels=1, out_channels=1, width=128, depth=3, noise_channels=32, max_positions=10000):
        super().__init__()
        half = noise_channels // 2
        self.register_buffer("freqs", (1 / max_positions) ** (torch.arange(half) / half), persistent=False)
        layers, fan_in = [], in_channels + noise_channels
        for _ in range(depth):
            layers += [torch.nn.Linear(fan_in, width), torch.nn.SiLU()]
            fan_in = width
        layers.append(torch.nn.Linear(fan_in, out_channels))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        angles = noise_labels.to(torch.float32)[:, None] * self.freqs[None, :]
        emb = torch.cat([angles.cos(), angles.sin()], dim=1).expand(x.shape[0], -1)
        return self.net(torch.cat([x.to(torch.float32), emb], dim=1)).to(x.dtype)


# ----------------------------------------------------------------------------
# Demo: the same MLP, the same data, the same budget -- four preconditionings.

NAMES = ["VP", "VE", "iDDPM", "EDM"]
COLORS = {"VP": "tab:blue", "VE": "tab:orange", "iDDPM": "tab:green", "EDM": "tab:red"}
STYLES = {"VP": "-", "VE": "--", "iDDPM": ":", "EDM": "-"}   # VP, VE, iDDPM coincide in several panels


def make_setups(sigma_data, seed):
    """{name: (preconditioned net, loss)} for the four columns of Table 1, nets starting from the same weights."""
    def mlp(out_channels=1):
        torch.manual_seed(seed)
        return ToyMLP(out_channels=out_channels)
    return {
        "VP": (VPPrecond(mlp(), 1, 1), VPLoss()),
        "VE": (VEPrecond(mlp(), 1, 1), VELoss()),
        "iDDPM": (iDDPMPrecond(mlp(2), 1, 1), iDDPMLoss()),
        "EDM": (EDMPrecond(mlp(), 1, 1, sigma_data=sigma_data), EDMLoss(sigma_data=sigma_data)),
    }


def variance_table(setups, y, sigmas, generator):
    """Var of the network input c_in (y + n), of the effective target (y - c_skip (y + n)) / c_out (Eq. 8),
    and the effective weight lambda c_out^2, at each sigma."""
    rows = []
    for name, (net, loss_fn) in setups.items():
        for sigma in sigmas:
            x = y + sigma * torch.randn(y.shape, generator=generator, dtype=y.dtype)
            c_skip, c_out, c_in, _ = net.scalings(sigma_column(sigma, y).to(y.dtype))
            target = (y - c_skip * x) / c_out
            effective_weight = loss_fn.weight(torch.tensor(sigma, dtype=torch.float64)) * c_out[0, 0] ** 2
            rows.append((name, sigma, float((c_in * x).var()), float(target.var()), float(effective_weight)))
    return rows


def train(net, loss_fn, mix, steps, batch, lr, seed, device):
    """Adam on fresh toy samples each step; returns the training loss per step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net.train().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    for _ in range(steps):
        y = mix.sample(batch, g).to(device, torch.float32)
        loss = loss_fn(net, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return net.eval(), history


@torch.no_grad()
def loss_per_sigma(D, mix, sigmas, n, sigma_data, generator, device):
    """At each sigma, with EDM's weighting lambda_EDM (the paper's Fig. 5a, in spirit):
    the loss lambda E |D(y + n; sigma) - y|^2, and the part of it that training could still remove,
    lambda E |D - D*|^2, where D* is the toy's exact denoiser (chapter 01)."""
    losses, errors = [], []
    for sigma in sigmas:
        y = mix.sample(n, generator)
        x = y + sigma * torch.randn(y.shape, generator=generator, dtype=y.dtype)
        D_x = D(x.to(device), torch.tensor(sigma, device=device)).cpu().to(torch.float64).reshape(y.shape)
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        losses.append(weight * float(((D_x - y) ** 2).mean()))
        errors.append(weight * float(((D_x - mix.denoise(x, sigma)) ** 2).mean()))
    return np.array(losses), np.array(errors)


def plot_scalings(setups, file):
    import matplotlib.pyplot as plt
    sigma = torch.logspace(-3, np.log10(80), 400)
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.8))
    titles = ["c_skip", "|c_out|", "c_in", "c_noise: DDPM timestep (VP, iDDPM)", "c_noise: log-sigma (VE, EDM)"]
    for name, (net, _) in setups.items():
        c_skip, c_out, c_in, c_noise = [c.flatten() for c in net.scalings(sigma[:, None])]
        noise_ax = axes[3] if name in ("VP", "iDDPM") else axes[4]
        for ax, v in zip([axes[0], axes[1], axes[2], noise_ax], [c_skip, c_out.abs(), c_in, c_noise]):
            ax.plot(sigma, v, color=COLORS[name], ls=STYLES[name], lw=2, label=name)
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle("Table 1: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)   "
                 f"(sigma_data = {setups['EDM'][0].sigma_data:.2f})")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_loss_per_sigma(sigmas, losses, errors, floor, sigma_draws, file):
    import matplotlib.pyplot as plt
    fig, (ax, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 10), sharex=True, gridspec_kw=dict(height_ratios=[2, 2, 1]))
    for name in losses:
        ax.plot(sigmas, losses[name], "o-", ms=3, color=COLORS[name], label=name)
        ax2.plot(sigmas, errors[name], "o-", ms=3, color=COLORS[name], label=name)
    ax.plot(sigmas, floor, "k--", lw=1.5, label="exact denoiser D* (irreducible)")
    ax.set_yscale("log")
    ax.set_ylabel("lambda_EDM E |D - y|^2")
    ax.set_title("Loss per noise level after training, all measured with EDM's weighting")
    ax.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("lambda_EDM E |D - D*|^2")
    ax2.set_title("What is left to learn: distance to the exact denoiser")
    for name, s in sigma_draws.items():
        log_s = s.double().log().numpy()
        density, edges = np.histogram(log_s, bins=60, range=(np.log(1e-3), np.log(200)), density=True)
        ax3.stairs(density, np.exp(edges), color=COLORS[name], lw=1.5, label=name)
    ax3.set_xscale("log")
    ax3.set_xlabel("sigma")
    ax3.set_ylabel("density of ln sigma")
    ax3.set_title("p_train: where each loss spends its training samples (Table 1)")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_samples(mix, samples, w1, file):
    """Histograms of the first seed's samples, and W1 per model (bars: mean over seeds; ticks: each seed)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(samples) + 1, figsize=(4 * len(samples) + 4, 3.5))
    bins = np.linspace(-2.5, 2.5, 101)
    grid = torch.linspace(-2.5, 2.5, 400, dtype=torch.float64)
    for ax, (name, s) in zip(axes, samples.items()):
        ax.plot(grid, mix.density(grid, 0.0), color="k", lw=1, label="p_data")
        s = s.flatten().numpy()   # density over all samples, so mass outside the plotted range shows as missing
        ax.hist(s, bins=bins, weights=np.full(len(s), 1 / (len(s) * (bins[1] - bins[0]))), histtype="step",
                color=COLORS[name], lw=1.5, label="generated")
        ax.set_title(f"{name}, first seed: W1 = {w1[name][0]:.4f}")
    axes[0].legend(fontsize=8)
    names = list(w1)
    axes[-1].bar(names, [np.mean(w1[n]) for n in names], color=[COLORS.get(n, "0.5") for n in names])
    for i, n in enumerate(names):
        axes[-1].plot([i] * len(w1[n]), w1[n], "k_", ms=14)
    axes[-1].set_yscale("log")
    axes[-1].set_title("W1 to the data (lower is better)")
    axes[-1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def training_sigmas(loss_fn, n):
    """The sigmas a loss draws for n examples (its p_train), caught by a stand-in network."""
    drawn = []

    def catch(x, sigma, labels=None, augment_labels=None):
        drawn.append(sigma.flatten())
        return x
    loss_fn(catch, torch.zeros(n, 1))
    return torch.cat(drawn)


def main():
    parser = common.base_parser(__doc__)
    parser.add_argument("--train-steps", type=int, default=2000, help="Adam steps per model (default: 2000)")
    parser.add_argument("--batch", type=int, default=512, help="training batch size (default: 512)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate, cosine-decayed (default: 2e-3)")
    parser.add_argument("--seeds", type=int, default=2, help="training runs per preconditioning (default: 2)")
    parser.add_argument("--samples", type=int, default=10000, help="generated samples per model (default: 10000)")
    parser.add_argument("--num-steps", type=int, default=64,
                        help="EDM sampler steps; 64 keeps its own error below the models' (default: 64)")
    args = parser.parse_args()
    if min(args.train_steps, args.seeds) < 1 or min(args.batch, args.samples, args.num_steps) < 2 or not args.lr > 0:
        raise SystemExit("error: need --train-steps, --seeds >= 1; --batch, --samples, --num-steps >= 2; --lr > 0")
    device = common.get_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)   # the MLP's matrices are too small to gain from threads; one avoids contention
    outdir = common.out_dir(__file__, args.outdir)
    common.seed_all(args.seed)
    toy = common.load("01_toy_1d")
    edm_sampler = common.load("04_stochastic_sampler").edm_sampler
    mix = toy.default_mixture()
    g = torch.Generator().manual_seed(args.seed)
    sigma_data = float(mix.sample(1_000_000, g).std())
    seeds = [args.seed + k for k in range(args.seeds)]
    start = time.time()

    # 1. Table 1 as curves, and EDM's unit-variance property in numbers.
    setups = make_setups(sigma_data, seeds[0])
    plot_scalings(setups, f"{outdir}/scalings.png")
    print(f"Toy data std = {sigma_data:.4f} (used as EDM's sigma_data).")
    print("Variance of the network input c_in (y + n), of the effective target (y - c_skip (y + n)) / c_out "
          "(Eq. 8), and the effective weight lambda c_out^2:")
    print(f"  {'':6s} {'sigma':>7s} {'Var input':>10s} {'Var target':>11s} {'lambda c_out^2':>15s}")
    y = mix.sample(200_000, g)
    for name, sigma, v_in, v_target, w in variance_table(setups, y, [0.002, 0.1, 1.0, 10.0, 80.0], g):
        print(f"  {name:6s} {sigma:7.3f} {v_in:10.4f} {v_target:11.4f} {w:15.4f}")

    # 2.-4. For each seed: the same MLP trained under each preconditioning + loss with the same budget,
    # its loss per noise level (all measured with EDM's weighting, as in Fig. 5a), and its samples
    # from chapter 04's deterministic EDM sampler (same latents for every model).
    sigmas = np.logspace(np.log10(0.002), np.log10(80), 25)
    floor, _ = loss_per_sigma(mix, mix, sigmas, 4096, sigma_data, torch.Generator().manual_seed(1), "cpu")
    latents = torch.randn([args.samples, 1], generator=g, dtype=torch.float64)
    truth = mix.sample(args.samples, g)
    losses = {name: [] for name in NAMES}
    errors = {name: [] for name in NAMES}
    w1 = {name: [] for name in NAMES}
    samples = {}
    for seed in seeds:
        for name, (net, loss_fn) in make_setups(sigma_data, seed).items():
            t0 = time.time()
            _, history = train(net, loss_fn, mix, args.train_steps, args.batch, args.lr, seed, device)
            loss, error = loss_per_sigma(net, mix, sigmas, 4096, sigma_data, torch.Generator().manual_seed(1), device)
            losses[name].append(loss)
            errors[name].append(error)
            with torch.no_grad():
                x = edm_sampler(net, latents.to(device), num_steps=args.num_steps).cpu()
            w1[name].append(toy.wasserstein1(x, truth))
            samples.setdefault(name, x)
            print(f"seed {seed} {name:6s}: trained {args.train_steps} steps, final loss "
                  f"{np.mean(history[-100:]):.4f}, W1 {w1[name][-1]:.4f}  ({time.time() - t0:.1f} s)")
    with torch.no_grad():
        w1["exact D"] = [toy.wasserstein1(edm_sampler(mix, latents, num_steps=args.num_steps), truth)]
    w1["data vs data"] = [toy.wasserstein1(mix.sample(args.samples, g), truth)]

    losses = {name: np.mean(v, axis=0) for name, v in losses.items()}
    errors = {name: np.mean(v, axis=0) for name, v in errors.items()}
    draws = {name: training_sigmas(loss_fn, 100_000) for name, (_, loss_fn) in setups.items()}
    plot_loss_per_sigma(sigmas, losses, errors, floor, draws, f"{outdir}/loss_per_sigma.png")
    plot_samples(mix, samples, w1, f"{outdir}/samples.png")

    print(f"\nSame MLP, {args.train_steps} steps x batch {args.batch}, seeds {seeds}; "
          f"EDM sampler, {args.num_steps} steps; W1 to {args.samples} data samples.")
    print("Error: lambda_EDM E |D - D*|^2 to the exact denoiser D*, mean over log-spaced sigmas in each bucket.")
    lo, mid, hi = sigmas < 0.05, (sigmas >= 0.05) & (sigmas <= 5), sigmas > 5
    print(f"  {'':13s} {'W1 mean':>8s} {'W1 per seed':>20s} {'error, all':>12s} "
          f"{'sigma<0.05':>11s} {'0.05..5':>9s} {'>5':>9s}")
    for name, values in w1.items():
        line = f"  {name:13s} {np.mean(values):8.4f} {' '.join(f'{v:.4f}' for v in values):>20s}"
        if name in errors:
            e = errors[name]
            line += f" {e.mean():12.4f} {e[lo].mean():11.4f} {e[mid].mean():9.4f} {e[hi].mean():9.4f}"
        print(line)
    print(f"Figures in {outdir}/ ; total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
