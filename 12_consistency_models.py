"""12 -- Beyond the paper: one- and two-step generation by tuning an EDM network into a consistency model (ECT).

A consistency model (Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models") learns the flow map of EDM's
ODE (Eq. 4): f(x, sigma) is the point at sigma_min that the ODE reaches from x at sigma, so one evaluation
f(sigma_max z, sigma_max) is a sample. It is EDM's Eq. 7 with scalings that make the boundary condition
f(x, sigma_min) = x exact for any network F (Song et al. Sec. 3, "Parameterization", and App. C):

    f(x; sigma) = c_skip x + c_out F(c_in x; c_noise),   c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
                  c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2),   c_in, c_noise: EDM's.

Training asks f(x_t, t) = f(x_r, r) of two points of one ODE trajectory, r < t. Consistency distillation (CD,
Song et al. Algorithm 2) makes x_r from x_t by a teacher's ODE step; consistency training (CT, Algorithm 3) uses
x_t = y + t n and x_r = y + r n with the same noise n. Easy Consistency Tuning (ECT: Geng, Pokle, Luo, Lin, Kolter,
"Consistency Models Made Easy", ICLR 2025; code locuslab/ect) runs CT from a trained EDM network: with r = 0 the
target is the clean image, Eq. 2's denoising loss, so a denoiser already is the consistency model of the largest
step; ECT then shrinks Delta t = t - r over training. Sampling is Algorithm 1: f at sigma_max, then re-noise to
a level tau and apply f again, one network evaluation per step.

Run:  python 12_consistency_models.py      (a few minutes on 2 CPU cores; figures in out/12_consistency_models/)
      python 12_consistency_models.py tune --network <07 run>/network-snapshot-000064.pt --outdir runs/ect --kimg 8
      python 08_evaluate_fid.py generate --network runs/ect/network-snapshot-000008.pt --steps 2
"""

import argparse
import contextlib
import copy
import glob
import json
import math
import os
import shutil
import sys
import time

import torch

import common

ch05 = common.load("05_preconditioning")   # EDM's preconditioning (Eq. 7), which f keeps but for the boundary
ch06 = common.load("06_unet")              # the networks and their files: ECT starts from a trained one


# ----------------------------------------------------------------------------
# The consistency function f and its boundary condition.

class ConsistencyPrecond(ch05.EDMPrecond):
    """f(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with EDM's c_in, c_noise and the boundary scalings above:
    at sigma = sigma_min, c_skip = 1 and c_out = 0 to the bit, so f(x; sigma_min) = x for any (finite) F. Far from
    sigma_min the scalings are EDM's (App. B.6), which is why an EDM network's F starts ECT (`from_diffusion`)."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.002, sigma_max=float("inf"), sigma_data=0.5):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data)

    def scalings(self, sigma):
        _, _, c_in, c_noise = super().scalings(sigma)
        s = sigma - self.sigma_min                              # 0 at the boundary, exactly
        c_skip = self.sigma_data ** 2 / (s ** 2 + self.sigma_data ** 2)
        c_out = s * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        return c_skip, c_out, c_in, c_noise

    def sampler_from_args(self, args):
        """The sampler 08's command line asks for (08 asks the network it loads): Algorithm 1 on --steps (or --nfe)
        levels, default 1; the levels from --sigma-max down to --sigma-min, Eq. 5 with --rho between them."""
        diffusion = [flag for name, flag in ODE_SAMPLER_OPTIONS.items() if getattr(args, name) is not None]
        if diffusion:
            raise ValueError(f"{diffusion[0]} chooses an ODE sampler; a consistency model samples with Algorithm 1: "
                             f"--steps, --sigma-min (its last level), --sigma-max, --rho")
        levels = {k: getattr(args, k) for k in ("sigma_min", "sigma_max", "rho") if getattr(args, k) is not None}
        return make_sampler(args.num_steps or args.nfe or 1, **levels)


ODE_SAMPLER_OPTIONS = {"solver": "--solver", "sigma_steps": "--sigma-steps", "discretization": "--disc",
                       "schedule": "--schedule", "scaling": "--scaling", "S_churn": "--S-churn", "S_min": "--S-min",
                       "S_max": "--S-max", "S_noise": "--S-noise"}   # 08's options (dest: flag) that consistency lacks


def from_diffusion(net, sigma_min=0.002, **changes):
    """ECT's starting point: the consistency model with the F, the weights and sigma_data of `net`, an EDM network
    (an official edm-*.pkl, a 07 snapshot; a consistency model too); `changes` alter its configuration (e.g.
    dropout=0.2, ECT's for CIFAR-10)."""
    if not isinstance(net, ch05.EDMPrecond):
        raise ValueError(f"ECT starts from an EDM-preconditioned network (EDMPrecond), not {type(net).__name__}")
    if not hasattr(net, "init_config"):      # built by hand (the toy's MLP): the same F, rewrapped
        return ConsistencyPrecond(copy.deepcopy(net.model), net.img_resolution, net.img_channels, net.label_dim,
                                  net.use_fp16, sigma_min, net.sigma_max, net.sigma_data)
    kwargs = {**net.init_config["kwargs"], "sigma_min": sigma_min, **changes}
    f = ch06.from_official_config("ConsistencyPrecond", kwargs)
    ch06.load_weights(f, net.state_dict())
    return f


# ----------------------------------------------------------------------------
# Algorithm 1: multistep consistency sampling.

def consistency_sampler(net, x, sigmas, extra_args=None, randn_like=torch.randn_like):
    """From the noisy images x at tau_0 = sigmas[0]: x <- f(x; tau_i) for every level tau_i = sigmas[i] before the
    final 0, re-noised before each step but the first to x + sqrt(tau_i^2 - sigma_min^2) z -- a point at tau_i of a
    trajectory that ends at x, which sits at sigma_min. One network evaluation per level; float64 images."""
    sigma_min = getattr(net, "sigma_min", 0)
    x = x.to(torch.float64)
    for i, tau in enumerate(sigmas[:-1]):
        if i > 0:
            x = x + (tau ** 2 - sigma_min ** 2).sqrt() * randn_like(x)
        x = common.denoise(net, x, tau, extra_args)
    return x


def consistency_levels(num_steps, sigma_min=0.821, sigma_max=80.0, rho=7.0, net=None):
    """The levels of `num_steps` steps, then 0: sigma_max alone for one step; else Eq. 5's from sigma_max down to
    sigma_min, the last level (default: 0.821, ECT's and iCT's two-step level for CIFAR-10)."""
    if num_steps == 1:
        return torch.tensor([common.noise_range(net, 0, sigma_max)[1], 0], dtype=torch.float64)
    if not 0 < sigma_min < sigma_max or not rho > 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
    return common.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, net)


def make_sampler(num_steps=1, sigma_min=0.821, sigma_max=80.0, rho=7.0):
    """Algorithm 1 on consistency_levels, as 08's protocol and the demos take a sampler: sample(net, latents,
    extra_args, randn_like) from unit latents, its noise from randn_like (per seed: seed-exact in 08)."""
    if num_steps < 1:
        raise ValueError(f"a consistency model needs at least 1 step, got {num_steps}")
    consistency_levels(num_steps, sigma_min, sigma_max, rho)                 # checks the settings now

    def sample(net, latents, extra_args=None, randn_like=torch.randn_like):
        sigmas = consistency_levels(num_steps, sigma_min, sigma_max, rho, net).to(latents.device)
        return consistency_sampler(net, latents.to(torch.float64) * sigmas[0], sigmas, extra_args, randn_like)
    options = dict(num_steps=num_steps, sigma_max=sigma_max)
    options.update(dict(sigma_min=sigma_min, rho=rho) if num_steps > 1 else {})
    sample.settings = dict(function="consistency_sampler", solver="consistency", sigma_steps="edm", options=options)
    return sample


# ----------------------------------------------------------------------------
# Training: the consistency condition as a loss; CD's and ECT's pairs (x_t, t), (x_r, r).

def consistency_loss(net, x_t, t, x_r, r, c=0.0, labels=None, augment_labels=None):
    """d(f(x_t; t), f(x_r; r)) / (t - r) per example ([N, 1, ...]): d the L2 distance, sqrt(|.|^2 + c^2) - c
    (pseudo-Huber for c > 0), the weighting 1/(t - r) ECT's (the consistency condition as a derivative: the loss
    stays O(1) as Delta t shrinks; ECT's CIFAR-10 code -- its later ImageNet code weights by 1/t^2 + 1/sigma_data^2).
    The target f(x_r; r) is the network itself without gradient (ECT's choice; Song et al. use an EMA of it) and
    sees the same dropout as f(x_t; t)."""
    with torch.random.fork_rng(devices=[x_t.device] if x_t.device.type == "cuda" else []):
        f_t = net(x_t, t, labels, augment_labels=augment_labels)      # the random state is restored after it ...
    with torch.no_grad():
        f_r = net(x_r, r, labels, augment_labels=augment_labels)      # ... so that this call draws the same masks
    distance = torch.linalg.vector_norm((f_t - f_r).flatten(1), dim=1)    # (its gradient at 0 is 0, not NaN)
    distance = (distance.square() + c ** 2).sqrt() - c if c > 0 else distance
    return (distance / (t - r).flatten()).reshape(-1, *[1] * (x_t.ndim - 1))


def heun_step(D, x, t, r):
    """One Heun step of Eq. 4 from t down to r > 0 (per-example levels): EDM's solver as CD's teacher step."""
    d = (x - D(x, t)) / t
    x_euler = x + (r - t) * d
    return x + (r - t) * (d + (x_euler - D(x_euler, r)) / r) / 2


class DistillationLoss:
    """Consistency distillation (Song et al. Algorithm 2) from a teacher denoiser D(x, sigma): r = t_n < t = t_{n+1}
    adjacent levels of an N-level Eq. 5 grid from sigma_min to sigma_max (n uniform), x_t = y + t n, and x_r one
    Heun step of Eq. 4 with D from x_t. The fixed point of its loss is Heun's solver on that grid, pinned to the
    data by the boundary condition at t_1 = sigma_min."""

    def __init__(self, teacher, sigma_min=0.002, sigma_max=80.0, N=18, rho=7.0, c=0.0):
        self.teacher, self.c = teacher, c
        self.levels = common.edm_sigma_steps(N, sigma_min, sigma_max, rho)[:-1].flip(0)   # t_1 = sigma_min < ... < t_N

    def __call__(self, net, images, labels=None, augment_pipe=None):
        if augment_pipe is not None:   # the teacher's Heun step would need the same augment labels: not built
            raise ValueError("consistency distillation here takes no augmentation: pass augment_pipe=None")
        column = lambda v: v.to(images.device, images.dtype).reshape(-1, *[1] * (images.ndim - 1))
        n = torch.randint(1, len(self.levels), [len(images)])
        t, r = column(self.levels[n]), column(self.levels[n - 1])
        x_t = images + t * torch.randn_like(images)
        with torch.no_grad():
            x_r = heun_step(self.teacher, x_t, t, r).to(images.dtype)
        return consistency_loss(net, x_t, t, x_r, r, self.c, labels)


class ECTLoss:
    """ECT's consistency training (ECMLoss of locuslab/ect): t with ln t ~ N(P_mean, P_std^2), r = t - Delta t by
    ECT's mapping Delta t = t (1 + k sigmoid(-b t)) / q^(a + 1) in stage a = images seen / stage_kimg (07 tells it
    through `schedule`), x_t = y + t n, x_r = y + r n with the same n. Stage 0 with q = 2 sets r to the boundary
    for t up to ln 7 ~ 1.95 (Delta t >= t): the denoising loss where the network is a denoiser; every stage halves
    Delta t towards the consistency condition's differential limit. Deviation: f's boundary is at sigma_min, not
    0, so t is drawn above sigma_min (the log-normal cut there: ECT's draws below it are 0.5 %) and r clamped to
    sigma_min, where f(x_r; r) = x_r exactly (ECT: r clamped to 0, target y, with EDM's scalings in training)."""

    def __init__(self, sigma_min, P_mean=-1.1, P_std=2.0, q=2.0, k=8.0, b=1.0, c=0.0, stage_kimg=3200.0):
        self.sigma_min, self.P_mean, self.P_std, self.q, self.k, self.b, self.c = sigma_min, P_mean, P_std, q, k, b, c
        self.stage_nimg, self.stage = max(round(stage_kimg * 1e3), 1), 0

    def schedule(self, cur_nimg):
        self.stage = cur_nimg // self.stage_nimg

    def r_of(self, t):
        delta_t = t * (1 + self.k * torch.sigmoid(-self.b * t)) / self.q ** (self.stage + 1)
        return (t - delta_t).clamp(min=self.sigma_min)

    def draw_t(self, shape, device):
        """ln t ~ N(P_mean, P_std^2) cut below ln sigma_min (inverse CDF of the normal on the part above)."""
        low = torch.special.ndtr(torch.tensor((math.log(self.sigma_min) - self.P_mean) / self.P_std))
        u = low + (1 - low) * torch.rand(shape, device=device, dtype=torch.float64)
        return (self.P_mean + self.P_std * torch.special.ndtri(u)).exp()

    def __call__(self, net, images, labels=None, augment_pipe=None):
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        lowest = torch.tensor(self.sigma_min, dtype=y.dtype).nextafter(torch.tensor(1, dtype=y.dtype))
        t = self.draw_t([len(y), *[1] * (y.ndim - 1)], y.device).to(y.dtype).clamp(min=lowest)  # above f's boundary
        r = self.r_of(t)
        n = torch.randn_like(y)
        return consistency_loss(net, y + t * n, t, y + r * n, r, self.c, labels, augment_labels)


# ----------------------------------------------------------------------------
# Tuning through 07's loop: 07's train() with 12's start (the network, the loss, the previews' sampler); 07
# supplies DDP/torchrun, mixed precision, the EMA, snapshots, exact resume and the stats.

# ECT's CIFAR-10 settings (locuslab/ect run_ecm.sh: 200k steps of 128 images) as 07's flags and 12's options.
# Deviations: 07's Adam with a linear ramp-up over 2000 steps stands in for ECT's RAdam (whose rectification is
# a warm-up of about 2 / (1 - beta_2) = 2000 steps); 07's EMA half-life (0.887 Mimg = ECT's beta 0.9999 per step
# of 128) keeps its ramp-up at the start.
ECT_FLAGS = ["--batch", "128", "--lr", "1e-4", "--lr-rampup", "0.256", "--dropout", "0.2", "--augment", "0",
             "--ema", "0.887", "--P-mean", "-1.1", "--P-std", "2.0"]
ECT_OPTIONS = dict(q=2.0, stage_kimg=3200.0, k=8.0, b=1.0, c=0.0, sigma_min=0.002)


def tune_parser():
    p = argparse.ArgumentParser(prog="12_consistency_models.py tune", allow_abbrev=False,
                                description="Easy Consistency Tuning of an EDM network through 07's training loop "
                                            "(torchrun too): snapshots that 08 generate --steps 1|2 samples.",
                                epilog="Every other option is 07's (07_train_cifar10.py --help): --data (default: what "
                                       "a 07 snapshot's run trained on; an edm-*.pkl needs it, e.g. --data cifar10 "
                                       "--no-cond), --batch, --batch-gpu, --precision, --tick, "
                                       "--snap, --resume, --stop-kimg, --seed, --device, ... ECT's CIFAR-10 values "
                                       "are the defaults: " + " ".join(ECT_FLAGS) + " (--P-mean/--P-std: ECT's t)")
    positive = common.number(float, low=1e-6)
    p.add_argument("--network", required=True, help="the EDM network to start from: an official edm-*.pkl (path "
                   "or URL) or a 07 network-snapshot-*.pt")
    p.add_argument("--outdir", required=True, help="the run folder (07's)")
    p.add_argument("--kimg", type=positive, default=25600, help="tuning length, kimg (default: 25600, ECT's 200k "
                   "steps of 128)")
    p.add_argument("--q", type=common.number(float, low=1.0001), default=ECT_OPTIONS["q"],
                   help="Delta t shrinks by this factor per stage (default: 2)")
    p.add_argument("--stage-kimg", type=positive, default=ECT_OPTIONS["stage_kimg"],
                   help="images per stage, kimg (default: 3200, ECT's 250 ticks of 12.8 kimg)")
    p.add_argument("--k", type=common.number(float, low=0), default=ECT_OPTIONS["k"],
                   help="Delta t = t (1 + k sigmoid(-b t)) / q^(stage + 1) (default: 8)")
    p.add_argument("--b", type=common.number(float), default=ECT_OPTIONS["b"], help="(default: 1)")
    p.add_argument("--c", type=common.number(float, low=0), default=ECT_OPTIONS["c"],
                   help="pseudo-Huber constant of the distance (default: 0, the L2 distance)")
    p.add_argument("--sigma-min", type=positive, default=ECT_OPTIONS["sigma_min"],
                   help="f's boundary: f(x, sigma_min) = x (default: 0.002)")
    return p


def tune_options(argv):
    """07's options (ECT's defaults, the teacher run's data, then argv's) with 12's added: they are recorded in
    training_options.json and must match on --resume, as 07's own."""
    args, rest = tune_parser().parse_known_args(argv)
    ch07 = common.load("07_train_cifar10")
    options = ch07.parse_args(ECT_FLAGS + teacher_data(ch07, args.network) + rest +
                              ["--duration", str(args.kimg / 1e3), "--outdir", args.outdir])
    vars(options).update({k: v for k, v in vars(args).items() if k not in ("outdir", "kimg")})   # 07's already
    return options


def teacher_data(ch07, network):
    """The data flags of the 07 run that wrote `network` (its folder's training_options.json), else none."""
    saved = {} if "://" in network else ch07.read_run_options(os.path.dirname(os.path.abspath(network)))
    if not saved:
        return []
    flags = ["--data", saved["data"], "--data-dir", saved["data_dir"], "--cond" if saved["cond"] else "--no-cond",
             "--xflip" if saved["xflip"] else "--no-xflip"]
    return flags + (["--resolution", str(saved["resolution"])] if saved["resolution"] else [])


def tuning(options, data):
    """07's start: the consistency model from --network (ECT's dropout), ECT's loss, 2-step previews."""
    net = common.rank0_first(ch06.load_network, options.network)       # a URL downloads once per node
    f = from_diffusion(net, options.sigma_min, dropout=options.dropout)
    if (f.img_resolution, f.img_channels, f.label_dim) != (data.resolution, data.channels, data.label_dim):
        raise ValueError(f"{options.network} is a {f.img_resolution}x{f.img_resolution}x{f.img_channels} network with "
                         f"{f.label_dim} classes, the data {data.name} {data.resolution}x{data.resolution}x"
                         f"{data.channels} with {data.label_dim}: pass the --data (--cond, --resolution) it learned")
    if options.augment > 0 and f.model.map_augment is None:
        raise ValueError(f"--augment {options.augment}: {options.network} takes no augment labels; pass --augment 0")
    loss = ECTLoss(f.sigma_min, options.P_mean, options.P_std, options.q, options.k, options.b, options.c,
                   options.stage_kimg)
    return f, loss, make_sampler(2)


def tune(options):
    """The tune command (options: `tune_options`'s): 07's train() with `tuning`, under torchrun too."""
    rank, _, device = common.init_distributed(options.device)
    try:
        kimg = common.load("07_train_cifar10").train(options, device, tuning)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()       # every rank is done before any closes its connections
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        last = (sorted(glob.glob(os.path.join(options.outdir, "network-snapshot-*.pt"))) or ["(none)"])[-1]
        print(f"\ntuned to {kimg:g} kimg: {options.outdir}/preview-*.png are 2-step samples. One- and two-step "
              f"images of the last snapshot:\n  python 08_evaluate_fid.py generate --network {last} --steps 1\n"
              f"  python 08_evaluate_fid.py generate --network {last} --steps 2")


# ============================================================================
# Demo (a): the 1-D toy of chapter 01, whose exact denoiser D* gives the exact flow map: ground truth for f.

def flow_map(D, x, sigma, sigma_min=0.002, num_steps=256):
    """f*(x; sigma): Eq. 4 solved from sigma down to sigma_min with the denoiser D by 09's DPM-Solver++(3M) on
    num_steps log-uniform steps (3rd order: `toy_part` prints how little halving them moves it)."""
    if sigma <= sigma_min:
        return x.to(torch.float64)
    sigmas = torch.linspace(math.log(sigma), math.log(sigma_min), num_steps + 1, dtype=torch.float64).exp()
    return common.load("09_fast_samplers").sample_dpmpp_3m(D, x, sigmas)


class Counted:
    """A loss with a schedule, for a loop that does not call it (01's train_toy): it counts the images itself."""

    def __init__(self, loss):
        self.loss, self.nimg = loss, 0

    def __call__(self, net, images):
        self.loss.schedule(self.nimg)
        self.nimg += len(images)
        return self.loss(net, images)


TOY_SIGMAS = (0.002, 0.01, 0.05, 0.2, 0.5, 1, 2, 5, 10, 20, 40, 80)   # where f is compared with f*
NFES = (1, 2, 4)
TOY_COLORS = {"exact denoiser D*": "tab:blue", "MLP denoiser D (EDM)": "tab:orange", "exact flow map f*": "black",
              "CD, exact teacher D*": "tab:green", "ECT, c = 1": "tab:red", "ECT, c = 0": "tab:purple"}
SOLVERS = {"euler": "Euler", "dpmpp2m": "DPM-Solver++(2M)", "dpmpp3m": "DPM-Solver++(3M)", "ipndm": "iPNDM",
           "heun": "Heun"}


def toy_models(args, mix, sigma_data, log):
    """The toy's networks, all 01's MLP: the EDM denoiser (05's EDMPrecond and EDMLoss, 01's train_toy), and three
    consistency models started from it with the same budget -- CD with the exact D* as teacher, and ECT twice:
    with c = 1 (pseudo-Huber ~ the squared error in 1-D) and with ECT's CIFAR-10 c = 0 (the L2 distance, |.| in
    1-D, whose minimiser is the median of CT's random targets, not their mean)."""
    ch01 = common.load("01_toy_1d")
    torch.manual_seed(args.seed)
    D = ch05.EDMPrecond(ch01.ToyMLP(), 1, 1, sigma_data=sigma_data)
    train = lambda net, loss, lr: ch01.train_toy(net, mix, loss, args.toy_steps, args.toy_batch, lr, args.seed)[0]
    stage_kimg = args.toy_steps * args.toy_batch / args.toy_stages / 1e3
    start = time.time()
    models = {"MLP denoiser D (EDM)": train(D, ch05.EDMLoss(sigma_data=sigma_data), 2e-3)}
    log(f"  EDM's MLP denoiser: {args.toy_steps} steps of {args.toy_batch} ({time.time() - start:.1f} s)")
    for name, loss in [("CD, exact teacher D*", DistillationLoss(mix, c=1.0)),
                       ("ECT, c = 1", Counted(ECTLoss(0.002, c=1.0, stage_kimg=stage_kimg))),
                       ("ECT, c = 0", Counted(ECTLoss(0.002, c=0.0, stage_kimg=stage_kimg)))]:
        start = time.time()
        models[name] = train(from_diffusion(D), loss, 2e-3)
        log(f"  {name}: {args.toy_steps} steps from the MLP denoiser ({time.time() - start:.1f} s)")
    return models


@torch.no_grad()
def toy_errors(fs, mix, n, seed):
    """{name: [RMS of f(x; sigma) - f*(x; sigma) over x ~ p(x; sigma)] for sigma in TOY_SIGMAS}, and the largest
    change of f* when its steps are halved."""
    g = torch.Generator().manual_seed(seed)
    errors, change = {name: [] for name in fs}, 0.0
    for sigma in TOY_SIGMAS:
        y = mix.sample(n, g)
        x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
        exact = flow_map(mix, x, sigma)
        change = max(change, common.rms(exact, flow_map(mix, x, sigma, num_steps=128)))
        for name, f in fs.items():
            errors[name].append(common.rms(common.denoise(f, x, torch.tensor(sigma, dtype=torch.float64)), exact))
    return errors, change


@torch.no_grad()
def toy_w1(models, mix, latents, seed):
    """{row: {NFE: (NFE spent, W1 to p_data)}}: Algorithm 1 with each consistency model (and the exact f*) at 1, 2
    and 4 steps; 09's solvers on D* and on the MLP's D at the same NFE (Heun: the odd budget below; 35 too)."""
    ch09, ch11 = common.load("09_fast_samplers"), common.load("11_post_hoc_ema")
    exact_f = lambda x, sigma, class_labels=None: flow_map(mix, x, float(sigma))
    noise = lambda: (lambda x, g=torch.Generator().manual_seed(seed): torch.randn(x.shape, generator=g, dtype=x.dtype))
    rows = {}
    consistency = [(name, f) for name, f in models.items() if name.startswith(("CD", "ECT"))]
    for name, f in [("exact flow map f*", exact_f)] + consistency:
        rows[f"{name}, Algorithm 1"] = {k: (k, ch11.w1_to_mixture(make_sampler(k)(f, latents, None, noise()), mix))
                                        for k in NFES}
    for which, D in [("D*", mix), ("MLP D", models["MLP denoiser D (EDM)"])]:
        for solver, title in SOLVERS.items():
            budgets = {k: ch09.spend(solver, k) for k in NFES + (35,) * (solver == "heun")}
            row = {k: (1, ch11.w1_to_mixture(make_sampler(1)(D, latents), mix)) for k in (1,) if solver == "euler"}
            row.update({k: (n, ch11.w1_to_mixture(ch09.make_sampler(solver, n)(D, latents), mix))
                        for k, n in budgets.items() if n >= (3 if solver == "heun" else 2)})
            rows[f"{title} on {which}"] = row
    return rows


@torch.no_grad()
def cd_bound(f, mix, levels, n, seed):
    """Song et al.'s Theorem 1 made computable for CD on the toy: along the teacher's Heun steps x_N -> ... -> x_1
    (grid levels t_N > ... > t_1 = sigma_min), f(x_N; t_N) - f*(x_N) = sum_k [f(x_k; t_k) - f(x_{k-1}; t_{k-1})]
    + [x_1 - f*(x_N)], because f(x_1; sigma_min) = x_1. So RMS error <= e_grid + sum_k rho_k: Heun's own error on
    CD's grid (the loss's fixed point) plus the consistency residuals rho_k (RMS) along the way. Returns
    {t_N: (error, e_grid, sum of rho)} for a few starting levels."""
    g, result = torch.Generator().manual_seed(seed), {}
    for N in (len(levels) // 3, 2 * len(levels) // 3, len(levels) - 1):
        t = levels[N]
        y = mix.sample(n, g)
        xs = [y + float(t) * torch.randn(y.shape, generator=g, dtype=torch.float64)]
        for k in range(N, 0, -1):
            xs.append(heun_step(mix, xs[-1], levels[k], levels[k - 1]))
        fs = [common.denoise(f, x, levels[N - i]) for i, x in enumerate(xs)]
        exact = flow_map(mix, xs[0], float(t))
        result[float(t)] = (common.rms(fs[0], exact), common.rms(xs[-1], exact),
                            sum(common.rms(a, b) for a, b in zip(fs[:-1], fs[1:])))
    return result


def toy_part(args, device, log=print):
    """Part (a): train, measure and print; returns what the figure and the conclusion need."""
    mix = common.load("01_toy_1d").default_mixture()
    g = torch.Generator().manual_seed(args.seed)
    sigma_data = float(mix.sample(1_000_000, g).std())
    log(f"(a) 1-D toy (chapter 01, data std {sigma_data:.3f}): 01's MLP, trained and tuned on the CPU")
    models = toy_models(args, mix, sigma_data, log)
    errors, change = toy_errors({"exact denoiser D*": mix, **models}, mix, args.toy_error_samples, args.seed + 1)
    latents = torch.randn(args.samples, 1, generator=g, dtype=torch.float64)
    w1 = toy_w1(models, mix, latents, args.seed + 2)
    floor = [common.load("11_post_hoc_ema").w1_to_mixture(mix.sample(args.samples, g), mix) for _ in range(4)]
    bound = cd_bound(models["CD, exact teacher D*"], mix, DistillationLoss(mix).levels.double(), 4096, args.seed + 3)

    log(f"\nRMS error of f(x; sigma) against the exact flow map f*(x; sigma) (x ~ p(x; sigma); f* by 09's 3M on 256 "
        f"steps, moves {change:.0e} with 128):")
    log(f"  {'sigma':<22}" + "".join(f"{s:>7g}" for s in TOY_SIGMAS))
    for name, row in errors.items():
        log(f"  {name:<22}" + "".join(f"{e:7.3f}" for e in row))
    log("  (a denoiser as f: D(x; sigma) is the mean of the data given x, not the end of x's trajectory)")
    log(f"\nCD's error bound (cd_bound: Heun's error on CD's 18-level grid + the consistency residuals along it):")
    for t, (error, e_grid, rho) in bound.items():
        log(f"  from sigma {t:7.3f}: error {error:.4f} <= {e_grid:.4f} + {rho:.4f} = {e_grid + rho:.4f}")
    log(f"\nW1 to p_data of {args.samples} samples from the same latents (a draw of the data itself: "
        f"{min(floor):.4f}-{max(floor):.4f} in 4 draws); 'w@n': spent n NFE:")
    log(f"  {'NFE':<38}" + "".join(f"{k:>12}" for k in NFES + (35,)))
    for name, row in w1.items():
        cells = [(f"{row[k][1]:.4f}" + ("" if row[k][0] == k else f"@{row[k][0]}")) if k in row else "-"
                 for k in NFES + (35,)]
        log(f"  {name:<38}" + "".join(f"{c:>12}" for c in cells))
    return dict(mix=mix, models=models, errors=errors, w1=w1, floor=floor, bound=bound, latents=latents)



# ============================================================================
# Demo (b), (c): ECT of a 07 --preset tiny network through 07's loop, measured against the teacher's own ODE.

# lr 2e-4: at 5e-4 the 1-step error fell as well but jumped (0.23 -> 0.41) at a stage change before recovering.
TINY_TUNE = ["--batch", "32", "--lr", "2e-4", "--lr-rampup", "0", "--ema", "0.001", "--dropout", "0", "--q", "2"]


def tune_tiny(args, teacher, device, outdir):
    """ECT of `teacher` for --tune-kimg (the tune command's own path: tune_options, 07's train, `tuning`), in 8
    stages, a snapshot every --tune-snap kimg; returns [(kimg, seconds since the start, snapshot)]."""
    run_dir = os.path.join(outdir, "ect-run")
    shutil.rmtree(run_dir, ignore_errors=True)                             # a fresh run: (c) times it
    options = tune_options(["--network", teacher, "--outdir", run_dir, "--kimg", str(args.tune_kimg), *TINY_TUNE,
                            "--stage-kimg", str(args.tune_kimg / 8), "--tick", str(args.tune_snap), "--snap",
                            str(args.tune_snap), "--device", str(device), "--seed", str(args.seed)])
    print(f"  ECT: {args.tune_kimg:g} kimg through 07's loop into {run_dir} (07's log: {run_dir}/log.txt) ...",
          flush=True)
    os.makedirs(run_dir)
    start = time.time()
    with open(os.path.join(run_dir, "log.txt"), "w") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        common.load("07_train_cifar10").train(options, device, tuning)
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        ticks = [json.loads(line) for line in f]
    return [(t["kimg"], t["timestamp"] - start, os.path.join(run_dir, f"network-snapshot-{int(t['kimg']):06d}.pt"))
            for t in ticks if "rank_digests" in t]


def image_part(args, device, outdir):
    """Parts (b) and (c): the teacher, its ECT, and every sampler from the same latents and labels."""
    path = args.network or common.load("09_fast_samplers").tiny_network(
        argparse.Namespace(train_kimg=args.teacher_kimg, seed=args.seed), device, outdir)
    print(f"\n(b) images: ECT of {path}, measured as 09 measures solvers")
    return measure_images(args, path, tune_tiny(args, path, device, outdir), device)


@torch.no_grad()
def measure_images(args, path, snapshots, device):
    ch08, ch09 = common.load("08_evaluate_fid"), common.load("09_fast_samplers")
    teacher = ch08.load_net(path, device)
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.latents, teacher.img_channels, teacher.img_resolution, teacher.img_resolution,
                          generator=g, dtype=torch.float64).to(device)
    classes = torch.randint(max(teacher.label_dim, 1), (args.latents,), generator=g)
    labels = torch.nn.functional.one_hot(classes, teacher.label_dim).float().to(device) if teacher.label_dim else None
    extra = {"class_labels": labels}
    noise = lambda: (lambda x, gen=torch.Generator(device).manual_seed(args.seed + 5):
                     torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device))

    def D(x, sigma):                # (09's reference_solve checks its convergence on a prefix of the batch)
        return common.denoise(teacher, x, sigma, {"class_labels": None if labels is None else labels[:len(x)]})

    # The exact processes from these latents: the teacher's ODE endpoint (09's converged 3M), and Algorithm 1's two
    # steps with the teacher's converged flow map in place of f and the same re-noising draw.
    start = time.time()
    ode, change = ch09.reference_solve(D, latents, 0.002, 80.0, args.reference_steps)
    tau = float(consistency_levels(2)[1])
    renoised = ode + (tau ** 2 - 0.002 ** 2) ** 0.5 * noise()(ode)
    two_step, _ = ch09.reference_solve(D, renoised / tau, 0.002, tau, args.reference_steps // 2)
    rows = {"teacher's ODE endpoint": (None, ode), "exact 2 steps (f = teacher's flow map)": (2, two_step)}
    for solver, nfe in [("heun", 35), ("euler", 2), ("dpmpp2m", 2), ("ipndm", 2)]:
        rows[f"{SOLVERS[solver]}, {nfe} NFE"] = (nfe, ch09.make_sampler(solver, nfe)(D, latents))
    rows["teacher D as f, 1 step"] = (1, make_sampler(1)(teacher, latents, extra))
    last = ch08.load_net(snapshots[-1][2], device)
    for k in (1, 2):
        samples = make_sampler(k)(last, latents, extra, noise())
        rows[f"ECT {snapshots[-1][0]:g} kimg, {k} step{'s' * (k > 1)}"] = (k, samples)
    solver_nfes = {name: {n: common.rms(ch09.make_sampler(name, n)(D, latents), ode) for n in (2, 4, 6, 8, 10)}
                   for name in ("dpmpp2m", "ipndm")}
    cost = [(0.0, 0.0, common.rms(rows["teacher D as f, 1 step"][1], ode),
             common.rms(make_sampler(2)(from_diffusion(teacher).to(device), latents, extra, noise()), two_step))]
    for kimg, seconds, snapshot in snapshots:
        f = ch08.load_net(snapshot, device)
        cost.append((kimg, seconds, common.rms(make_sampler(1)(f, latents, extra), ode),
                     common.rms(make_sampler(2)(f, latents, extra, noise()), two_step)))

    print(f"  {args.latents} latents; the ODE endpoint: {args.reference_steps} 3M steps (halving them moves it "
          f"{change:.0e}); 2 steps re-noise to tau = {tau:g} ({time.time() - start:.0f} s)")
    print(f"  {'':44}{'NFE':>5}{'RMS to the ODE endpoint':>26}{'to exact 2 steps':>19}")
    for name, (nfe, x) in list(rows.items())[1:]:
        to_two = f"{common.rms(x, two_step):19.4f}" if nfe == 2 and "step" in name else ""
        print(f"  {name:<44}{nfe:>5}{common.rms(x, ode):26.4f}{to_two}")
    print("  (a second step draws fresh noise: exact 2 steps are another sample, not the ODE endpoint)")
    print(f"\n(c) what the tuning costs: RMS of ECT's 1-step samples to the ODE endpoint, of its 2-step ones to the "
          f"exact 2 steps")
    print(f"  {'kimg':>8}{'seconds':>9}{'1 step':>9}{'2 steps':>9}")
    for kimg, seconds, one, two in cost:
        print(f"  {kimg:8.3f}{seconds:9.1f}{one:9.4f}{two:9.4f}")
    print("  the teacher's solvers, RMS to the ODE endpoint at NFE " + ", ".join(map(str, (2, 4, 6, 8, 10))) + ": "
          + "; ".join(f"{SOLVERS[n]} " + " ".join(f"{e:.4f}" for e in row.values()) for n, row in solver_nfes.items()))
    return dict(rows=rows, ode=ode, cost=cost, solver_nfes=solver_nfes, teacher=path, labels=classes)



# ----------------------------------------------------------------------------
# Figures, the conclusion, the command line.

@torch.no_grad()
def plot_toy(toy, file):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    ax = axes[0]
    for name, row in toy["errors"].items():
        ax.plot(TOY_SIGMAS, [max(e, 1e-6) for e in row], "s--" if "denoiser" in name else "o-", ms=4,
                color=TOY_COLORS[name], label=name)
    ax.set(xscale="log", yscale="log", xlabel="noise level sigma", ylabel="RMS of f(x; sigma) - f*(x; sigma)",
           title="f against the exact flow map f* (x ~ p(x; sigma))")
    ax.legend(fontsize=8)
    ax, top = axes[1], 3.0
    for name, row in toy["w1"].items():                    # the solvers on the MLP, the network the CMs start from
        if " on D*" not in name:
            points = [row[k] for k in sorted(row) if row[k][1] < top]
            name = name.replace(", Algorithm 1", "")
            ax.plot(*zip(*points), "o-" if name in TOY_COLORS else "v--", ms=4, label=name, color=TOY_COLORS.get(name))
    ax.axhspan(min(toy["floor"]), max(toy["floor"]), color="0.85", label="draws of the data itself")
    off = [f"{name}, {n} NFE: {w:.1f}" for name, row in toy["w1"].items() for n, w in row.values() if w >= top]
    ax.set(xscale="log", yscale="log", ylim=(None, top), xlabel="NFE", ylabel="W1 to p_data",
           title="W1 to p_data against NFE (solvers on the MLP D)\noff the chart: " + "; ".join(off))
    ax.title.set_fontsize(9)
    ax.set_xticks([1, 2, 3, 4, 35], ["1", "2", "3", "4", "35"])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    ax = axes[2]
    grid = torch.linspace(-2.5, 2.5, 400, dtype=torch.float64)
    ax.plot(grid, toy["mix"].density(grid, 0.0), "k", lw=1, label="p_data")
    bins = torch.linspace(-2.5, 2.5, 101)
    for name in ("CD, exact teacher D*", "ECT, c = 1", "MLP denoiser D (EDM)"):
        x = make_sampler(1)(toy["models"][name], toy["latents"]).flatten().float()
        ax.hist(x.numpy(), bins=bins.numpy(), density=True, histtype="step", lw=1.5, color=TOY_COLORS[name],
                label=f"{name}, 1 step")
    ax.set(xlabel="x", ylabel="density", title="one-step samples (a denoiser's: the mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_images(images, ncol, file):
    """One grid: a row per sampler (its first `ncol` latents), labelled with its RMS to the ODE endpoint."""
    rows = images["rows"]
    x = torch.cat([x[:ncol] for _, x in rows.values()]).float().cpu()
    labels = [name if nfe is None else f"{name} ({common.rms(x_all, images['ode']):.3f})"
              for name, (nfe, x_all) in rows.items()]
    common.load("07_train_cifar10").save_grid(x.clamp(-1, 1), file, "The same latents and labels through every "
                                             "sampler (RMS to the ODE endpoint)", labels, ncol=ncol)


def plot_cost(images, file):
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    kimg, seconds, one, two = zip(*images["cost"])
    ax.plot(kimg, one, "o-", label="ECT, 1 step (to the ODE endpoint)")
    ax.plot(kimg, two, "s-", label="ECT, 2 steps (to exact 2 steps)")
    ax.set(xlabel="ECT's images, kimg (seconds on this machine: " + ", ".join(f"{s:.0f}" for s in seconds[1:]) + ")",
           ylabel="RMS error", title="What tuning costs: ECT's error against the images it has seen")
    ax.legend(fontsize=8)
    for name, row in images["solver_nfes"].items():
        ax2.plot(list(row), list(row.values()), "v--", label=f"{SOLVERS[name]} on the teacher")
    ax2.axhline(one[0], color="0.5", ls=":", label="the teacher as f, 1 step (0 kimg)")
    ax2.axhline(one[-1], color="tab:blue", ls="-", label=f"ECT, 1 step, after {kimg[-1]:g} kimg")
    ax2.set(xlabel="NFE", title="The teacher's solvers: RMS to its ODE endpoint")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def conclude(toy, images, outdir, seconds):
    """What this shows, from the numbers printed above."""
    w1, err, cost = toy["w1"], {name: row[-1] for name, row in toy["errors"].items()}, images["cost"]
    cd, ect, ect0 = (w1[f"{n}, Algorithm 1"] for n in ("CD, exact teacher D*", "ECT, c = 1", "ECT, c = 0"))
    solver = lambda k: min(row[k][1] for name, row in w1.items() if " on " in name and row.get(k, (0,))[0] == k)
    heun = {name: row[35][1] for name, row in w1.items() if 35 in row}
    tight = "at every level shown" if all(e <= g + r for e, g, r in toy["bound"].values()) else "NOT everywhere"
    two_nfe = min(common.rms(x, images["ode"]) for name, (_, x) in images["rows"].items() if name.endswith("2 NFE"))
    under = [kimg for kimg, _, one, _ in cost[1:] if one < two_nfe]
    compare = lambda a, b, word: word if a < b else "not " + word
    match = ", ".join(f"{SOLVERS[name]} at {min(n for n, e in row.items() if e < cost[-1][2])} NFE"
                      for name, row in images["solver_nfes"].items() if min(row.values()) < cost[-1][2])
    lines = [
        f"toy.png  A denoiser is not a consistency function: at sigma = 80 its RMS to the flow map f* is "
        f"{err['exact denoiser D*']:.3f} (D*),",
        f"  {err['MLP denoiser D (EDM)']:.3f} (01's MLP). From that MLP, CD (exact teacher) reaches "
        f"{err['CD, exact teacher D*']:.3f} and ECT (no teacher) {err['ECT, c = 1']:.3f}; CD stays under its",
        f"  derived bound {tight}. W1 to p_data at 1 / 2 NFE: CD {cd[1][1]:.4f} / {cd[2][1]:.4f}, ECT "
        f"{ect[1][1]:.4f} / {ect[2][1]:.4f}; the best 09 solver",
        f"  {solver(1):.4f} / {solver(2):.4f} (2 NFE: one step to sigma_min, one more); Heun needs 35 NFE for "
        f"{heun['Heun on D*']:.4f} (D*), {heun['Heun on MLP D']:.4f} (MLP).",
        f"  ECT with its CIFAR-10 distance (c = 0: |.| in 1-D, the median of CT's random targets): "
        f"{ect0[1][1]:.4f} / {ect0[2][1]:.4f}.",
        f"tiny_images.png, tuning_cost.png  After {cost[-1][0]:g} kimg of ECT ({cost[-1][1]:.0f} s) the tiny network's "
        f"1-step RMS to its ODE",
        f"  endpoint is {cost[-1][2]:.4f} (the EDM network as f: {cost[0][2]:.4f}; best snapshot "
        f"{min(c[2] for c in cost):.4f}), {compare(cost[-1][2], two_nfe, 'under')} the best",
        f"  2-NFE solver's {two_nfe:.4f} (under it at {len(under)} of {len(cost) - 1} snapshots); the "
        f"teacher's solvers reach it at: {match or 'none of those tried'}.",
        f"  Two steps against the exact two: {cost[0][3]:.4f} -> {cost[-1][3]:.4f}, "
        f"{compare(cost[-1][3], cost[0][3], 'lower')} than the untuned network's."]
    print(f"\nWhat this shows (files in {outdir}/; {seconds:.0f} s)\n  " + "\n  ".join(lines))


def parse_args(argv=None):
    """The demo's options, or with `tune` first the tune command's (`tune_options`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:
        return tune_options(argv[1:])
    parser = common.base_parser(__doc__)
    count = lambda low: common.number(int, low=low)
    parser.add_argument("--toy-steps", type=count(100), default=2000,
                        help="toy training steps per model (default: 2000)")
    parser.add_argument("--toy-batch", type=count(2), default=512, help="toy batch (default: 512)")
    parser.add_argument("--toy-stages", type=count(1), default=4, help="ECT's stages on the toy (default: 4)")
    parser.add_argument("--toy-error-samples", type=count(16), default=4096,
                        help="samples per sigma for the error against f* (default: 4096)")
    parser.add_argument("--samples", type=count(100), default=20000, help="toy samples per sampler (default: 20000)")
    parser.add_argument("--network", help="the teacher of (b): an EDM network file (default: 07 --preset tiny after "
                        "--teacher-kimg, 07's default run's if it matches, else trained into out/.../tiny-run)")
    parser.add_argument("--teacher-kimg", type=common.number(float, low=1), default=16,
                        help="training of the default teacher, kimg (default: 16)")
    parser.add_argument("--tune-kimg", type=common.number(float, low=0.1), default=8, help="ECT's length in (b), "
                        "kimg (default: 8)")
    parser.add_argument("--tune-snap", type=common.number(float, low=1), default=1,
                        help="its snapshot interval, kimg (07 names snapshots by whole kimg; default: 1)")
    parser.add_argument("--latents", type=count(8), default=32, help="image latents of (b) (default: 32)")
    parser.add_argument("--reference-steps", type=count(64), default=256, help="3M steps of the ODE endpoint "
                        "(default: 256)")
    return parser.parse_args(argv)


def demo(args):
    if args.network is not None and not os.path.isfile(args.network):
        raise FileNotFoundError(f"--network {args.network!r}: no such file (an EDM network-snapshot-*.pt or .pkl)")
    device, outdir = common.start(__file__, args)
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)              # small tensors: on a shared 2-core CPU threads only contend
    toy = toy_part(args, device)
    plot_toy(toy, f"{outdir}/toy.png")
    torch.set_num_threads(threads)        # 07's training keeps its threads
    images = image_part(args, device, outdir)
    plot_images(images, 8, f"{outdir}/tiny_images.png")
    plot_cost(images, f"{outdir}/tuning_cost.png")
    conclude(toy, images, outdir, time.time() - start)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv      # tune_options reads the teacher's run: errors in one line
    common.run(lambda argv: (tune if argv[:1] == ["tune"] else demo)(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
