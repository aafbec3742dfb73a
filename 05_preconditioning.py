"""05 -- Preconditioning and training: the network and training rows of Table 1.

Sec. 5 of the paper (Eq. 7-8, Table 1, App. B.6). Chapters 01-04 assumed an ideal denoiser; in practice
D is a network F wrapped in the preconditioning of Eq. 7,

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),

and trained with the weighted denoising loss E_{sigma ~ p_train, y ~ p_data, n ~ N(0, sigma^2 I)}
[lambda(sigma) |D(y + n; sigma) - y|^2], which Eq. 8 turns into a regression of F onto the effective target
(y - c_skip (y + n)) / c_out with weight lambda c_out^2. VP, VE, iDDPM and EDM differ only in these choices
(Table 1): `VPPrecond` ... `EDMPrecond` hold the scalings, `VPLoss` ... `EDMLoss` p_train and lambda. Flow
matching is one more column (`FMPrecond`, `FMLoss`: F predicts the velocity n - y, D = x_t - t F), and EDM2's
learned weighting (Karras et al. 2024) an option of the EDM and FM losses (`Uncertainty`, `denoising_loss`).
Chapter 06 supplies the U-Nets F; 07's `AugmentPipe` the losses' optional augmentation.

Run `python 05_preconditioning.py` (about two minutes on 2 CPU cores): it trains chapter 01's small MLP under each
preconditioning and loss with the same budget and compares them by their distance to the exact denoiser D*
per noise level and by their samples (scalings.png, loss_per_sigma.png, samples.png).
"""

import math
import time

import numpy as np
import torch

import common

# ----------------------------------------------------------------------------
# Preconditioners: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7), one column of Table 1 each.
# They wrap any raw network `model(x_in, noise_labels, class_labels=None, **kwargs)` (06's U-Nets) as
# `self.model`, so the state-dict keys are `model.*` (and `u` for iDDPM) as in the official checkpoints,
# and cast to float32 where the official code does, so a checkpoint gives its outputs to float32 rounding.

class Precond(torch.nn.Module):
    """What the four preconditioners share; each subclass supplies its column of Table 1 (`scalings`)."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False, logvar_channels=0):
        super().__init__()
        self.model = model                    # the raw network F (state-dict keys "model.*")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim            # 0 = unconditional
        self.use_fp16 = use_fp16              # run F in float16 (on CUDA only)
        # EDM2's learned loss weighting u(sigma) (EDM and FM only): inside the network, as EDM2 keeps it, so that
        # snapshots, the optimizer and resume carry it without a line of their own. Sampling never calls it.
        self.uncertainty = Uncertainty(logvar_channels) if logvar_channels else None

    def scalings(self, sigma):
        """c_skip, c_out, c_in, c_noise for a float32 sigma; the rows of Table 1."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """The noise level the network actually supports closest to sigma (identity unless discrete)."""
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **model_kwargs):
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
        D_x = c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)  # Eq. 7
        return (D_x, self.uncertainty(sigma)) if return_logvar else D_x


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
        # VP, VE and iDDPM predict the noise (c_skip = 1, |c_out| = sigma): at large sigma F's output must
        # cancel almost all of x, and any error of F enters D multiplied by sigma.
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
        self.register_buffer("u", common.iddpm_noise_levels(M, C_1, C_2, torch.float32))   # as official
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
                 sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, logvar_channels=0):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16, logvar_channels)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data  # standard deviation of the training data

    def scalings(self, sigma):
        # App. B.6, for data of std sigma_data: c_in makes the input c_in (y + n) unit variance, c_out the
        # effective target of Eq. 8, and c_skip is the choice that minimizes c_out, so F's errors are
        # amplified as little as possible. EDMLoss's lambda = 1/c_out^2 then weights every sigma by 1.
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class FMPrecond(Precond):
    """Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023; SD3, Esser et al. 2024) as a row of
    Table 1: F predicts the velocity v = n - y of x_t = (1 - t) y + t n, t = sigma / (1 + sigma) (02's RF), and
    D = x_t - t F, the same D(x; sigma) every sampler calls: x_t = x / (1 + sigma) for the noisy image x = y + sigma n."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float("inf"), logvar_channels=0):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16, logvar_channels)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def scalings(self, sigma):
        # D = x / (1 + sigma) - t F. |c_out| = t < 1 keeps F's errors small at every sigma, as EDM's c_out; but
        # neither input nor target has unit variance: Var[c_in x] = (sigma_data^2 + sigma^2) / (1 + sigma)^2 (1/2 at
        # sigma = 1 for unit data), Var[n - y] = 1 + sigma_data^2 -- c_skip is not EDM's error-minimizing choice.
        t = sigma / (1 + sigma)
        c_skip = 1 / (1 + sigma)
        c_out = -t
        c_in = 1 / (1 + sigma)
        c_noise = 1000 * t            # SD3's timestep convention: t in [0, 1] scaled to [0, 1000]
        return c_skip, c_out, c_in, c_noise


class Uncertainty(torch.nn.Module):
    """EDM2's u(sigma) (Karras et al. 2024, Sec. 2 and App. B; its Eq. 21): the learned loss weighting's log-variance,
    a smooth function of the noise level alone. As in EDM2: Fourier features cos(f_i c + phi_i) sqrt(2) of
    c = ln(sigma) / 4 (EDM's c_noise, fed here under FM's preconditioning too) with fixed random f_i ~ 2 pi N(0, 1),
    phi_i ~ U(0, 2 pi), then one linear layer whose weight is used normalized to unit length. (EDM2 also rescales
    the stored weight every step -- forced weight normalization, its Eq. 66 -- to keep Adam's step size constant over
    long runs; left out: D is untouched by it, and it would make the forward pass write to a parameter.)"""

    def __init__(self, channels=128):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))
        self.weight = torch.nn.Parameter(torch.randn(channels))

    def forward(self, sigma):
        features = (sigma.to(torch.float32).log()[..., None] / 4 * self.freqs + self.phases).cos() * math.sqrt(2)
        return features @ (self.weight / self.weight.norm())


def sigma_column(sigma, x):
    """sigma (python number, 0-d, [N] or [N, 1, ...]) as a float32 column [N or 1, 1, ..., 1] that broadcasts
    against x. A single sigma stays a single value, so the network embeds it once for the whole batch."""
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
    return sigma.reshape(-1, *[1] * (x.ndim - 1))


# VP's noise level sigma(t) of Table 1 and its inverse: deliberate twins of 02's vp_schedule (their home),
# carried here so that this file and common.py are all the preconditioners and losses need.

def vp_sigma(t, beta_d, beta_min):
    """VP noise level at time t: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (Table 1)."""
    # Written with exp(), as the official network and loss code write it; 02 writes e ** (...), as the
    # official sampler does. The two differ by a few units in the last place of e^(...), which the
    # cancellation in e^(...) - 1 at small t turns into up to 4e-12 relative in float64 (0.3 % in float32
    # near t = 2e-4; sigma(1) = 152.16698 here, 152.16696 there).
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d, beta_min):
    """The inverse t(sigma) of vp_sigma: solves beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2), as 02 does."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d


# ----------------------------------------------------------------------------
# Training losses: lambda(sigma) |D(y + n; sigma) - y|^2 with sigma ~ p_train (Table 1).
# Each returns the per-element loss; the training loop sums or averages it.

def denoising_loss(net, images, labels, augment_pipe, sigma, weight, learned=False):
    """lambda(sigma) |D(y + n; sigma) - y|^2 for a drawn sigma (Eq. 2 weighted as in Sec. 5).

    With an augment_pipe (App. F.2's non-leaking augmentation, 07's AugmentPipe) the clean images are
    augmented first; the pipe's labels tell the network which augmentation it sees (App. C.4), and D must
    undo only the noise.

    `learned`: EDM2's uncertainty weighting (its Eq. 21), lambda / e^u |D - y|^2 + u with u = u(sigma) from the
    network (Uncertainty). For fixed D its minimum over u, at each sigma, is where the derivative
    1 - lambda E|D - y|^2 / e^u vanishes: e^u = lambda E[|D - y|^2 | sigma], so every noise level ends up weighted
    by 1 / E[|D - y|^2 | sigma] whatever lambda was, and contributes 1 per element.
    """
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    if not learned:
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)
    D_yn, u = net(y + n, sigma, labels, augment_labels=augment_labels, return_logvar=True)
    return weight / u.exp() * ((D_yn - y) ** 2) + u


class VPLoss:
    """sigma = sigma(t), t ~ U(epsilon_t, 1); lambda = 1/sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0]], device=images.device)
        sigma = sigma_column(vp_sigma(1 + rnd_uniform * (self.epsilon_t - 1), self.beta_d, self.beta_min), images)
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

    def weight(self, sigma):
        return 1 / sigma ** 2


class VELoss:
    """ln sigma ~ U(ln sigma_min, ln sigma_max); lambda = 1/sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0]], device=images.device)
        sigma = sigma_column(self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform), images)
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

    def weight(self, sigma):
        return 1 / sigma ** 2


class iDDPMLoss:
    """sigma = u_j, j ~ U{0, ..., M-1}; lambda = 1/sigma^2 (iDDPM's extra L_vlb term is left out, as in Table 1)."""

    def __init__(self, C_1=0.001, C_2=0.008, M=1000):
        self.u = common.iddpm_noise_levels(M, C_1, C_2, torch.float32)
        self.M = M

    def __call__(self, net, images, labels=None, augment_pipe=None):
        j = torch.randint(self.M, [images.shape[0]], device=images.device)
        sigma = sigma_column(self.u.to(images.device)[j], images)
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma))

    def weight(self, sigma):
        return 1 / sigma ** 2


class EDMLoss:
    """ln sigma ~ N(P_mean, P_std^2); lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2.
    learned: EDM2's learned weighting on top (denoising_loss), for a network built with logvar_channels."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, learned=False):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.learned = learned

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0]], device=images.device)
        sigma = sigma_column((rnd_normal * self.P_std + self.P_mean).exp(), images)
        return denoising_loss(net, images, labels, augment_pipe, sigma, self.weight(sigma), self.learned)

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class FMLoss(EDMLoss):
    """Flow matching with SD3's logit-normal t: logit(t) ~ N(P_mean, P_std^2) is ln sigma ~ N(P_mean, P_std^2), since
    sigma = t / (1 - t) = e^logit(t) -- EDM's p_train (with SD3's 0 and 1); lambda = ((1 + sigma) / sigma)^2 = 1 / t^2
    = 1 / c_out^2, for which lambda |D - y|^2 = |F - (n - y)|^2 is the velocity loss (D - y = -t (F - (n - y)))."""

    def __init__(self, P_mean=0.0, P_std=1.0, learned=False):
        super().__init__(P_mean, P_std, sigma_data=None, learned=learned)

    def weight(self, sigma):
        return ((1 + sigma) / sigma) ** 2


# ============================================================================
# Demo: chapter 01's small MLP, the same data, the same budget -- four preconditionings.

TABLE1 = ["VP", "VE", "iDDPM", "EDM", "FM"]     # Table 1's columns, and FM's (flow matching)
NAMES = TABLE1 + ["EDM+u"]                        # + EDM with EDM2's learned weighting
COLORS = {"VP": "tab:blue", "VE": "tab:orange", "iDDPM": "tab:green", "EDM": "tab:red", "FM": "tab:purple",
          "EDM+u": "tab:brown"}
STYLES = {"VP": "-", "VE": "--", "iDDPM": ":", "EDM": "-", "FM": "-."}   # VP, VE, iDDPM coincide in several panels
MARKERS = {"VP": "o", "VE": "s", "iDDPM": "^", "FM": "D"}
SPLIT = 5.0   # the noise level separating "high" from "low and mid" in the splicing experiment


def make_setups(ch01, sigma_data, seed):
    """{name: (preconditioned net, loss)} for the columns of Table 1 and EDM2's learned weighting, around chapter
    01's ToyMLP, all starting from the same weights (EDM+u: and a u(sigma) of EDM2's size)."""
    def mlp(out_channels=1):
        torch.manual_seed(seed)
        return ch01.ToyMLP(out_channels=out_channels)
    return {
        "VP": (VPPrecond(mlp(), 1, 1), VPLoss()),
        "VE": (VEPrecond(mlp(), 1, 1), VELoss()),
        "iDDPM": (iDDPMPrecond(mlp(2), 1, 1), iDDPMLoss()),
        "EDM": (EDMPrecond(mlp(), 1, 1, sigma_data=sigma_data), EDMLoss(sigma_data=sigma_data)),
        "FM": (FMPrecond(mlp(), 1, 1), FMLoss()),
        "EDM+u": (EDMPrecond(mlp(), 1, 1, sigma_data=sigma_data, logvar_channels=128),
                  EDMLoss(sigma_data=sigma_data, learned=True)),
    }


def scaling_table(setups, y, sigmas, generator):
    """Per preconditioning and sigma: Var of the network input c_in (y + n), Var of the effective target
    (y - c_skip (y + n)) / c_out of Eq. 8, and |c_out|, the factor by which an error of F enters D."""
    rows = []
    for name, (net, _) in setups.items():
        for sigma in sigmas:
            x = y + sigma * torch.randn(y.shape, generator=generator, dtype=y.dtype)
            c_skip, c_out, c_in, _ = net.scalings(sigma_column(sigma, y).to(y.dtype))
            target = (y - c_skip * x) / c_out
            rows.append((name, sigma, float((c_in * x).var()), float(target.var()), float(c_out.abs())))
    return rows


def training_sigmas(loss_fn, n):
    """The sigmas a loss draws for n examples (its p_train), caught by a stand-in network."""
    drawn = []

    def catch(x, sigma, labels=None, augment_labels=None, return_logvar=False):
        drawn.append(sigma.flatten())
        return (x, torch.zeros_like(sigma)) if return_logvar else x
    loss_fn(catch, torch.zeros(n, 1))
    return torch.cat(drawn)


@torch.no_grad()
def loss_per_sigma(D, mix, sigmas, n, sigma_data, generator, device):
    """At each sigma, with EDM's weighting lambda_EDM for every model (one common metric; the paper's
    Fig. 5a, in spirit): the loss lambda E |D(y + n; sigma) - y|^2, and the part of it that training
    could still remove, lambda E |D - D*|^2, where D* is the toy's exact denoiser (chapter 01)."""
    losses, errors = [], []
    for sigma in sigmas:
        y = mix.sample(n, generator)
        x = y + sigma * torch.randn(y.shape, generator=generator, dtype=y.dtype)
        D_x = D(x.to(device), torch.tensor(sigma, device=device)).cpu().to(torch.float64).reshape(y.shape)
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        losses.append(weight * float(((D_x - y) ** 2).mean()))
        errors.append(weight * float(((D_x - mix.denoise(x, sigma)) ** 2).mean()))
    return np.array(losses), np.array(errors)


@torch.no_grad()
def weighting_check(net, loss_fn, mix, sigmas, n, batch, generator, device="cpu", momentum_steps=10):
    """EDM2's learned weighting against its optimum e^u = L = lambda E[|D - y|^2 | sigma] (denoising_loss), per sigma:
    u(sigma) and ln L, measured on n fresh draws, with the bound |u - ln L| <= 4 CV sqrt(1/n + 1/M) + h^2/2 |(ln L)''|
    within which a trained u is expected:
      * the log of a mean of m draws of q = lambda (D - y)^2 has the standard error CV / sqrt(m) (delta method;
        CV = std / mean of q at sigma, measured here);
      * u is linear in EDM2's Fourier features of c = ln(sigma) / 4 with frequencies ~ 2 pi N(0, 1), random features of
        a Gaussian kernel of std 1 / (2 pi) in c, h = 2 / pi in ln sigma: u(sigma) pools the training draws within
        about h of ln sigma, and smoothing by h moves it by ~h^2/2 times the curvature of ln L in ln sigma;
      * the draws it pools: counted conservatively as those of Adam's momentum window, 1 / (1 - beta_1) = 10 steps of
        `batch`, times the share P(|ln sigma' - ln sigma| < h) that p_train puts there: M = 10 batch P.
    Returns {u, log_L, bound, inside}, inside = sigma in p_train's central 95 % (outside it u is barely trained)."""
    u, log_L, cv = [], [], []
    for sigma in sigmas:
        y = mix.sample(n, generator)
        x = y + sigma * torch.randn(y.shape, generator=generator, dtype=y.dtype)
        D_x, u_sigma = net(x.to(device), torch.tensor(sigma, device=device), return_logvar=True)
        q = float(loss_fn.weight(torch.tensor(sigma, dtype=torch.float64))) * (D_x.cpu().double() - y) ** 2
        u.append(float(u_sigma))
        log_L.append(math.log(q.mean()))
        cv.append(float(q.std() / q.mean()))
    u, log_L, cv, ln_sigma = np.array(u), np.array(log_L), np.array(cv), np.log(sigmas)
    h, P_mean, P_std = 2 / math.pi, loss_fn.P_mean, loss_fn.P_std
    Phi = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
    M = momentum_steps * batch * (Phi((ln_sigma + h - P_mean) / P_std) - Phi((ln_sigma - h - P_mean) / P_std))
    curvature = np.gradient(np.gradient(log_L, ln_sigma), ln_sigma)
    bound = 4 * cv * np.sqrt(1 / n + 1 / M) + h ** 2 / 2 * np.abs(curvature)
    return dict(u=u, log_L=log_L, bound=bound, inside=np.abs(ln_sigma - P_mean) <= 2 * P_std)


class Spliced:
    """The trained D where `trained(sigma)` is true, the exact D* elsewhere: which noise levels' errors
    reach the samples?"""

    def __init__(self, net, exact, trained):
        self.net, self.exact, self.trained = net, exact, trained

    def __call__(self, x, sigma, class_labels=None):
        return self.net(x, sigma) if self.trained(float(sigma)) else self.exact(x, sigma)


def experiment(ch01, mix, sigma_data, seeds, train_steps=2000, batch=512, lr=2e-3, samples=10000, num_steps=64,
               device="cpu", log=print):
    """Train every preconditioning once per seed and measure it: loss and error to D* per sigma (EDM
    weighting), and W1 of its samples (chapter 04's EDM sampler) -- to the data, and to the samples the
    exact D* makes from the same latents (`W1 paired`: the latents' luck cancels) -- also when only its
    errors above SPLIT (`W1 high`) or at and below it (`W1 low`) reach the sampler.
    Returns {metric: {name: [per seed]}} and what the figures need."""
    sample_with = common.load("04_stochastic_sampler").make_sampler(num_steps)
    g = torch.Generator().manual_seed(seeds[0])
    latents = torch.randn([samples, 1], generator=g, dtype=torch.float64)
    truth = mix.sample(samples, g)
    sigmas = np.logspace(np.log10(0.002), np.log10(80), 25)

    def sample(D):
        with torch.no_grad():
            return sample_with(D, latents.to(device)).cpu()
    exact = sample(mix)
    r = {k: {name: [] for name in NAMES} for k in ("loss", "error", "W1", "W1 paired", "W1 high", "W1 low")}
    r["weighting"] = []
    first = {}
    for seed in seeds:
        for name, (net, loss_fn) in make_setups(ch01, sigma_data, seed).items():
            t0 = time.time()
            ch01.train_toy(net, mix, loss_fn, train_steps, batch, lr, seed, device)
            loss, error = loss_per_sigma(net, mix, sigmas, 4096, sigma_data, torch.Generator().manual_seed(1), device)
            r["loss"][name].append(loss)
            r["error"][name].append(error)
            x = first.setdefault(name, sample(net)) if seed == seeds[0] else sample(net)
            r["W1"][name].append(ch01.wasserstein1(x, truth))
            r["W1 paired"][name].append(ch01.wasserstein1(x, exact))
            r["W1 high"][name].append(ch01.wasserstein1(sample(Spliced(net, mix, lambda s: s > SPLIT)), exact))
            r["W1 low"][name].append(ch01.wasserstein1(sample(Spliced(net, mix, lambda s: s <= SPLIT)), exact))
            if getattr(loss_fn, "learned", False):
                r["weighting"].append(weighting_check(net, loss_fn, mix, sigmas, 4096, batch,
                                                      torch.Generator().manual_seed(2), device))
            log(f"seed {seed} {name:6s}: W1 to the data {r['W1'][name][-1]:.4f}, to D*'s samples "
                f"{r['W1 paired'][name][-1]:.4f}; distance to D* {error.mean():.4f}  ({time.time() - t0:.1f} s)")
    r["W1 exact"] = ch01.wasserstein1(exact, truth)
    r["W1 data"] = ch01.wasserstein1(mix.sample(samples, g), truth)
    floor, _ = loss_per_sigma(mix, mix, sigmas, 4096, sigma_data, torch.Generator().manual_seed(1), "cpu")
    return r, dict(sigmas=sigmas, floor=floor, first=first, truth=truth)


def plot_scalings(setups, file):
    import matplotlib.pyplot as plt
    sigma = torch.logspace(-3, np.log10(80), 400)
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.8))
    sigma_data = setups["EDM"][0].sigma_data
    titles = ["c_skip", "|c_out|", f"c_in (VP = iDDPM; EDM ~ them, sigma_data = {sigma_data:.2f})",
              "c_noise: timestep (VP, iDDPM; FM: 1000 t)", "c_noise: log-sigma (VE, EDM)"]
    # EDM first, wide and pale, so that the curves VP, VE and iDDPM share with it (or with each other) stay
    # visible on top of it; markers at staggered positions tell coinciding curves apart.
    for k, name in enumerate(["EDM", "VP", "VE", "iDDPM", "FM"]):
        c_skip, c_out, c_in, c_noise = [c.flatten() for c in setups[name][0].scalings(sigma[:, None])]
        noise_ax = axes[3] if name in ("VP", "iDDPM", "FM") else axes[4]
        style = dict(lw=5, alpha=0.45) if name == "EDM" else dict(lw=1.5, marker=MARKERS[name], ms=5,
                                                                  markevery=(10 * k, 40), markerfacecolor="none")
        for ax, v in zip([axes[0], axes[1], axes[2], noise_ax], [c_skip, c_out.abs(), c_in, c_noise]):
            ax.plot(sigma, v, color=COLORS[name], ls=STYLES[name], label=name, **style)
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("noise level sigma")
        ax.set_ylabel(title.split(":")[0].split(" (")[0])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle("Table 1: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). Only EDM and FM keep |c_out| (the gain "
                 "on F's errors) below 1 at high sigma; only EDM's c_in and c_out give unit variances")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def lowest_elsewhere(error, sigmas):
    """{name: [sigmas at which its distance to D* is below EDM's and every other model's]}, for name != EDM."""
    best = [min(error, key=lambda n: error[n][i]) for i in range(len(sigmas))]
    return {n: [float(s) for s, b in zip(sigmas, best) if b == n] for n in error if n != "EDM"}


def plot_loss_per_sigma(r, info, draws, file):
    import matplotlib.pyplot as plt
    sigmas = info["sigmas"]
    fig, (ax, ax2, ax4, ax3) = plt.subplots(4, 1, figsize=(8, 13), sharex=True,
                                           gridspec_kw=dict(height_ratios=[2, 2, 1.5, 1]))
    for name in NAMES:
        ax.plot(sigmas, np.mean(r["loss"][name], axis=0), "o-", ms=3, color=COLORS[name], label=name)
        ax2.plot(sigmas, np.mean(r["error"][name], axis=0), "o-", ms=3, color=COLORS[name], label=name)
    ax.plot(sigmas, info["floor"], "k--", lw=1.5, label="exact denoiser D* (irreducible)")
    ax.set_yscale("log")
    ax.set_ylabel("lambda_EDM E |D - y|^2")
    ax.set_title("Loss per noise level after training, every model measured with EDM's weighting")
    ax.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("lambda_EDM E |D - D*|^2")
    others = lowest_elsewhere({n: np.mean(r["error"][n], axis=0) for n in NAMES}, sigmas)
    ax2.set_title(f"What is left to learn: distance to the exact denoiser (EDM lowest at "
                  f"{len(sigmas) - sum(map(len, others.values()))} of {len(sigmas)} sigmas)")
    for k, w in enumerate(r["weighting"]):
        inside = w["inside"]
        ax4.fill_between(sigmas[inside], (w["log_L"] - w["bound"])[inside], (w["log_L"] + w["bound"])[inside],
                         color="0.85", label="ln L +- the bound, inside p_train's central 95 %" if k == 0 else None)
        ax4.plot(sigmas, w["log_L"], "k.", ms=5, label="ln L = ln lambda E|D - y|^2, measured" if k == 0 else None)
        ax4.plot(sigmas, w["u"], "-", color=COLORS["EDM+u"], label="u(sigma), learned (one line per seed)" if k == 0 else None)
    ax4.set_ylim(-2.5, 2.5)
    ax4.set_ylabel("log weight")
    ax4.set_title("EDM+u: the learned u(sigma) is its optimum ln L where p_train draws samples")
    ax4.legend(fontsize=8)
    for name in TABLE1:          # (EDM+u draws as EDM)
        density, edges = np.histogram(draws[name].double().log().numpy(), bins=60, range=(np.log(1e-3), np.log(200)),
                                      density=True)
        ax3.stairs(density, np.exp(edges), color=COLORS[name], lw=1.5, label=name)
    ax3.set_xscale("log")
    ax3.set_xlabel("noise level sigma")
    ax3.set_ylabel("density of ln sigma")
    ax3.set_title("p_train: where each loss spends its training samples (Table 1)")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_samples(mix, r, info, file):
    """Histograms of the first seed's samples, and W1 per model (bars: mean over seeds; dots: each seed)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(NAMES) + 1, figsize=(3.2 * len(NAMES) + 5, 3.8),
                             gridspec_kw=dict(width_ratios=[1] * len(NAMES) + [1.5]))
    bins = np.linspace(-2.5, 2.5, 101)
    grid = torch.linspace(-2.5, 2.5, 400, dtype=torch.float64)
    for ax, name in zip(axes, NAMES):
        s = info["first"][name].flatten().numpy()   # density over all samples: mass outside the range shows as missing
        ax.plot(grid, mix.density(grid, 0.0), color="k", lw=1, label="p_data")
        ax.hist(s, bins=bins, weights=np.full(len(s), 1 / (len(s) * (bins[1] - bins[0]))), histtype="step",
                color=COLORS[name], lw=1.5, label="generated")
        ax.set_title(f"{name}, first seed: W1 {r['W1 paired'][name][0]:.4f}\nto D*'s samples", fontsize=10)
        ax.set_xlabel("x (sample value)")
    axes[0].set_ylabel("probability density")
    axes[0].legend(fontsize=8)
    ax, x = axes[-1], np.arange(len(NAMES))
    for offset, key, label, alpha in [(-0.2, "W1", "to the data", 0.35), (0.2, "W1 paired", "to D*'s samples, same latents", 0.9)]:
        ax.bar(x + offset, [np.mean(r[key][n]) for n in NAMES], width=0.4, color=[COLORS[n] for n in NAMES],
               alpha=alpha, label=label)
        for i, n in enumerate(NAMES):
            ax.plot([i + offset] * len(r[key][n]), r[key][n], "k.", ms=6)
    ax.axhline(r["W1 data"], color="k", ls="--", lw=1, label="data vs data")
    ax.axhline(r["W1 exact"], color="0.4", ls=":", lw=1.5, label="exact D* to the data")
    ax.set_xticks(x, NAMES)
    ax.set_ylabel("Wasserstein-1 distance")
    order = [f"{n} {np.mean(r['W1 paired'][n]):.3f}" for n in sorted(NAMES, key=lambda n: np.mean(r["W1 paired"][n]))]
    ax.set_title("W1 to D*'s samples (dark bars: mean, dots: seeds):\n" + " < ".join(order[:3]) + " <\n"
                 + " < ".join(order[3:]), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def print_scalings(setups, y, generator):
    """The variance table; returns {(name, sigma): (Var input, Var target, |c_out|)}."""
    sigmas = [0.002, 0.1, 1.0, 10.0, 80.0]
    rows = {(name, sigma): tuple(values) for name, sigma, *values in scaling_table(setups, y, sigmas, generator)}
    print("Per noise level: Var of the network input c_in (y + n), Var of the effective target (Eq. 8), and |c_out|,")
    print("the gain with which an error of F enters D (lambda c_out^2 = 1 in all five: no column needed).")
    print(f"  {'':7s} " + "".join(f"{name:>25s}" for name in TABLE1))
    print(f"  {'sigma':>7s} " + "".join(f"{'input  target  |c_out|':>25s}" for name in TABLE1))
    for sigma in sigmas:
        print(f"  {sigma:7.3f} " + "".join("%25s" % ("%9.2f %7.3f %8.3f" % rows[(name, sigma)]) for name in TABLE1))
    return rows


def overlap(a, b):
    """Do two lists of per-seed values overlap?"""
    return max(a) >= min(b) and max(b) >= min(a)


def compare(r, name, other):
    """'<name>'s samples are ... <other>'s' by W1 paired, saying when the seeds overlap."""
    a, b = r["W1 paired"][name], r["W1 paired"][other]
    if overlap(a, b):
        return f"about as close as {other}'s (the per-seed values overlap)"
    return f"{'closer' if np.mean(a) < np.mean(b) else 'further'} than {other}'s"


def print_weighting(r, sigmas):
    """EDM2's learned weighting against its optimum (weighting_check), per seed; returns the summary numbers."""
    print("\nEDM2's learned weighting (EDM+u): u(sigma) against ln L, L = lambda E|D - y|^2 measured on 4096 fresh draws;")
    print("bound: 4 standard errors of what u can estimate (a kernel of width 2/pi in ln sigma over Adam's 10-step momentum")
    print("window of draws) and of L, + u's smoothing bias (weighting_check). First seed:")
    first = r["weighting"][0]
    print(f"  {'sigma':>8s} {'e^u':>7s} {'L':>7s} {'|u - ln L|':>11s} {'bound':>7s}")
    for i in np.flatnonzero(first["inside"]):
        print(f"  {sigmas[i]:8.3f} {math.exp(first['u'][i]):7.3f} {math.exp(first['log_L'][i]):7.3f} "
              f"{abs(first['u'][i] - first['log_L'][i]):11.3f} {first['bound'][i]:7.3f}")
    s = dict(ratio=[], worst=[], outside=[], bound=[], spread=[])
    for w in r["weighting"]:
        gap, inside = np.abs(w["u"] - w["log_L"]), w["inside"]
        s["ratio"].append((gap / w["bound"])[inside].max())
        s["worst"].append(gap[inside].max())
        s["outside"].append(gap[~inside].max())
        s["bound"].append(w["bound"][inside].min())
        s["spread"].append(np.ptp(w["log_L"][inside]))
    print(f"  per seed, inside p_train's central 95 % (sigma {sigmas[first['inside']][0]:.3f}..{sigmas[first['inside']][-1]:.3f}): "
          f"max |u - ln L| {' '.join(f'{v:.3f}' for v in s['worst'])}, max |u - ln L| / bound "
          f"{' '.join(f'{v:.2f}' for v in s['ratio'])};\n  outside it, where p_train draws almost nothing: "
          f"max |u - ln L| {' '.join(f'{v:.2f}' for v in s['outside'])}")
    return s


def print_results(r, info, draws, args, seeds, table, outdir):
    """The measured table, then what the figures show, with this run's numbers."""
    sigmas = info["sigmas"]
    ranges = {"<0.05": sigmas < 0.05, "0.05..5": (sigmas >= 0.05) & (sigmas <= SPLIT), ">5": sigmas > SPLIT}
    error = {name: np.mean(r["error"][name], axis=0) for name in NAMES}
    mean = {k: {name: np.mean(r[k][name]) for name in NAMES} for k in ("W1", "W1 paired", "W1 high", "W1 low")}
    share = {name: float((draws[name] > SPLIT).double().mean()) for name in NAMES}
    low_share = {name: float((draws[name] < 0.05).double().mean()) for name in NAMES}
    print(f"\nSame MLP, {args.train_steps} steps x batch {args.batch}, seeds {seeds}; EDM sampler, {args.num_steps} steps, "
          f"{args.samples} samples (means over seeds).")
    print("Distance to D*: lambda_EDM E |D - D*|^2, one metric for every model, mean over log-spaced sigmas. W1 paired:")
    print("to the samples the exact D* makes from the same latents; errors >5 / <=5 only: D* elsewhere.")
    print(f"  {'':6s} {'p_train >5':>10s} {'distance to D*':>15s} " + "".join(f"{k:>9s}" for k in ranges) +
          f" {'W1 to data':>11s} {'W1 paired':>10s} {'per seed':>14s} {'errors >5 only':>15s} {'<=5 only':>9s}")
    for name in NAMES:
        print(f"  {name:6s} {share[name]:10.0%} {error[name].mean():15.4f} "
              + "".join(f"{error[name][m].mean():9.4f}" for m in ranges.values())
              + f" {mean['W1'][name]:11.4f} {mean['W1 paired'][name]:10.4f} "
              + f"{' '.join(f'{v:.4f}' for v in r['W1 paired'][name]):>14s} {mean['W1 high'][name]:15.4f} {mean['W1 low'][name]:9.4f}")
    print(f"  exact D*: W1 to the data {r['W1 exact']:.4f} with these latents; two draws of data differ by {r['W1 data']:.4f}")
    u = print_weighting(r, sigmas)

    best = min(TABLE1, key=lambda n: error[n].mean())
    rivals = [n for n in TABLE1 if n != best]
    where = "in every range of sigma" if all(min(TABLE1, key=lambda n: error[n][m].mean()) == best
                                             for m in ranges.values()) else "on average"
    noise_predictors = ["VP", "VE", "iDDPM"]
    high = {n: error[n][ranges[">5"]].mean() for n in NAMES}
    gap = min(high[n] for n in noise_predictors) / max(high["EDM"], high["FM"])
    low, mid = ranges["<0.05"], ranges["0.05..5"]
    fm_low, fm_high = error["FM"][low].mean() / error["EDM"][low].mean(), high["EDM"] / high["FM"]
    print(f"""
What this shows
  {outdir}/scalings.png  lambda c_out^2 = 1 in all five (first table); they differ in the input
    (VE: variance {table[("VE", 80.0)][0]:.0f} at sigma = 80, EDM 1, FM {table[("FM", 1.0)][0]:.2f} at sigma = 1), in the target (FM's n - y: variance
    {table[("FM", 1.0)][1]:.2f}, EDM 1) and in |c_out|, the gain on F's errors: {table[("VP", 80.0)][2]:.0f} at sigma = 80 for VP, VE and iDDPM, {table[("EDM", 80.0)][2]:.2f} for
    EDM, whose c_skip minimizes it (App. B.6), {table[("FM", 80.0)][2]:.2f} for FM (t = sigma / (1 + sigma)).
  {outdir}/loss_per_sigma.png  {best}'s denoiser is the closest to D* {where} (mean {error[best].mean():.4f}
    vs {min(error[n].mean() for n in rivals):.4f}-{max(error[n].mean() for n in rivals):.4f} for the other columns of Table 1). Above sigma = 5 EDM and FM, whose |c_out| stays
    below 1, are at least {gap:.0f}x closer than VP, VE and iDDPM, although VP spends {share['VP']:.0%} of its training samples there,
    EDM {share['EDM']:.0%} and FM {share['FM']:.0%}: the gain |c_out|, not the sample count, decides. FM against EDM: {fm_high:.0f}x closer above
    sigma = 5, {fm_low:.0f}x further below 0.05, where SD3's p_train puts {low_share['FM']:.1%} of its samples and EDM's {low_share['EDM']:.0%}.
  {outdir}/samples.png  in 1-D the samples are decided at sigma <= 5 (VP's errors there alone cost
    W1 {mean['W1 low']['VP']:.4f}, above it {mean['W1 high']['VP']:.4f}), where VP is close to D* too ({error['VP'][mid].mean():.4f} at 0.05..5, EDM {error['EDM'][mid].mean():.4f}). Against
    D*'s samples from the same latents, EDM's are {compare(r, 'EDM', 'VP')},
    FM's {compare(r, 'FM', 'EDM')}; the paper's FID gains from its preconditioning and loss
    (Table 2, configs D, E) are measured on images.
  EDM+u  EDM2's learned weighting reaches its optimum e^u = lambda E|D - y|^2 inside p_train's central 95 %
    (|u - ln L| <= {max(u['worst']):.2f}, at most {max(u['ratio']):.2f} of the bound), so every noise level there contributes about equally;
    outside it u is untrained (off by up to {max(u['outside']):.1f}). EDM's lambda had equalized L to within a factor {math.exp(max(u['spread'])):.1f}
    already; the learned weights move the distance to D* to {error['EDM+u'][mid].mean():.4f} at 0.05..5 (EDM {error['EDM'][mid].mean():.4f}) and
    {high['EDM+u']:.4f} above 5 (EDM {high['EDM']:.4f}); its samples are {compare(r, 'EDM+u', 'EDM')}.""")


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--train-steps", type=common.number(int, low=1), default=2000,
                        help="Adam steps per model (default: 2000)")
    parser.add_argument("--batch", type=common.number(int, low=2), default=512, help="training batch size (default: 512)")
    parser.add_argument("--lr", type=common.number(float, low=1e-8, high=1), default=2e-3,
                        help="Adam learning rate, cosine-decayed (default: 2e-3)")
    parser.add_argument("--seeds", type=common.number(int, low=1), default=2,
                        help="training runs per preconditioning (default: 2)")
    parser.add_argument("--samples", type=common.number(int, low=2), default=5000,
                        help="generated samples per model (default: 5000)")
    parser.add_argument("--num-steps", type=common.number(int, low=2), default=64,
                        help="EDM sampler steps; 64 keeps its own error below the models' (default: 64)")
    return parser.parse_args(argv)


def demo(args):
    device, outdir = common.start(__file__, args)
    if device.type == "cpu":
        torch.set_num_threads(1)   # the MLP's matrices are too small to gain from threads; one avoids contention
    ch01 = common.load("01_toy_1d")
    mix = ch01.default_mixture()
    g = torch.Generator().manual_seed(args.seed)
    sigma_data = float(mix.sample(1_000_000, g).std())
    seeds = [args.seed + k for k in range(args.seeds)]
    start = time.time()

    setups = make_setups(ch01, sigma_data, seeds[0])
    plot_scalings(setups, f"{outdir}/scalings.png")
    print(f"Toy data std = {sigma_data:.4f} (used as EDM's sigma_data).")
    table = print_scalings(setups, mix.sample(200_000, g), g)
    draws = {name: training_sigmas(loss_fn, 100_000) for name, (_, loss_fn) in setups.items()}

    r, info = experiment(ch01, mix, sigma_data, seeds, args.train_steps, args.batch, args.lr, args.samples,
                         args.num_steps, device)
    plot_loss_per_sigma(r, info, draws, f"{outdir}/loss_per_sigma.png")
    plot_samples(mix, r, info, f"{outdir}/samples.png")
    print_results(r, info, draws, args, seeds, table, outdir)
    print(f"({time.time() - start:.0f} s)")


def main(argv=None):
    common.run(demo, parse_args(argv))


if __name__ == "__main__":
    main()
