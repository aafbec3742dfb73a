"""07 -- Training: the paper's recipe for CIFAR-10 (and ImageNet-64, and your own images).

Sec. 5, App. F and Table 7 on top of 05's loss (Eq. 2, Table 1) and 06's networks: the presets, the loop (Adam,
a learning-rate ramp-up, an EMA whose half-life is counted in images), App. F.2's non-leaking augmentation; then
the data and the machinery (resume bit for bit on CPUs, ticks with TFLOP/s and MFU, previews, torchrun,
gradient accumulation, autocast). --phema also keeps EDM2's power-function EMAs for chapter 11.

Presets (explicit flags override their values; `--preset X --help` lists them):
  cifar10     DDPM++ (or --arch ncsnpp), EDM, 200 Mimg, batch 512, lr 1e-3, EMA 0.5 Mimg, dropout 0.13, augment 0.12
  imagenet64  ADM, class-conditional, 2500 Mimg, batch 4096, lr 1e-4, EMA 50 Mimg, dropout 0.10, fp16
  tiny        the default: a 0.3M-parameter DDPM++ learns 16x16 coloured shapes in 64 kimg (minutes on a CPU)

Run:  python 07_train_cifar10.py > log.txt    (= --preset tiny; the log ends with which files to open)
      torchrun --standalone --nproc_per_node=8 07_train_cifar10.py --preset cifar10 --cond --outdir runs/c10
"""

import argparse
import contextlib
import copy
import glob
import hashlib
import json
import math
import os
import resource
import shlex
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

import common

ch04 = common.load("04_stochastic_sampler")
ch05 = common.load("05_preconditioning")
ch06 = common.load("06_unet")

# What is trained: the paper's setups (Table 7). Without a preset: its CIFAR-10 column (the official defaults).
DEFAULTS = dict(data=None, resolution=None, resize=True, cond=False, xflip=False, arch="ddpmpp", precond="edm",
                cbase=None, cres=None, blocks=None, attn=None, dropout=0.13, augment=0.12, label_dropout=0,
                duration=200, batch=512, batch_gpu=None, lr=1e-3, lr_rampup=10, ema=0.5, phema=[], precision="fp32",
                tick=50, snap=2500, sigma_data=0.5, P_mean=None, P_std=None,   # EDM data std; ln sigma ~ N(P_mean, P_std^2)
                loss_weighting="fixed")
PRESETS = {
    "cifar10": dict(data="cifar10"),
    "imagenet64": dict(cond=True, arch="adm", duration=2500, batch=4096, lr=1e-4, ema=50, dropout=0.10, augment=0,
                       precision="fp16", tick=200, snap=10000),   # Table 7's ImageNet-64 column
    # A few CPU-minutes: 16x16 shapes, a 0.3M-parameter DDPM++ (2000 steps of 32); short ramp-ups to match.
    "tiny": dict(data="shapes", resolution=16, cond=True, cbase=16, cres=[1, 2, 2], blocks=1, attn=[], duration=0.064,
                 batch=32, lr=2e-3, ema=0.005, dropout=0, augment=0, lr_rampup=0.01, tick=4, snap=16),
}


def train(args, device=torch.device("cpu"), start=None):
    """Train as Sec. 5 and Table 7 describe, writing into the run folder --outdir. Returns the kimg done.
    `start(args, data)` -> (network, loss, sampler of the previews) lets a later chapter (12) train its own network
    instead of a fresh one of network_config with 05's loss; a loss with `schedule(cur_nimg)` hears, before every
    step, how many images were seen (a schedule of training progress resumes exactly with them)."""
    rank, world_size = common.get_rank(), common.get_world_size()
    batch_gpu, rounds = split_batch(args.batch, args.batch_gpu, world_size)

    # Everything that can fail on bad input happens before the first file is written.
    data = load_dataset(args)
    resume = find_resume(args)
    class_name, net_kwargs = network_config(args, data)
    ch11 = common.load("11_post_hoc_ema") if args.phema else None   # EDM2's power-function EMA: chapter 11's maths

    # The network D (06 inside 05's preconditioning) and its loss (05: Table 1's p(sigma) and lambda(sigma)): the
    # same initial weights on every rank, then per-rank random streams for noise levels, noise, dropout, augmentation.
    torch.manual_seed(args.seed)
    net, loss_fn, preview = start(args, data) if start else \
        (ch06.from_official_config(class_name, net_kwargs), loss_function(args), ch04.make_sampler(18))
    class_name, net_kwargs = net.init_config["class_name"], net.init_config["kwargs"]
    net = net.train().requires_grad_(True).to(device)
    torch.manual_seed(derive_seed(args.seed, "rank", rank))
    net = net.to(memory_format=torch.channels_last) if args.channels_last else net
    ema = copy.deepcopy(net).eval().requires_grad_(False)                 # the averaged weights that get sampled
    phema = {sigma_rel: copy.deepcopy(ema) for sigma_rel in args.phema}   # --phema: a power-function EMA per width
    augment_generator = torch.Generator(device).manual_seed(derive_seed(args.seed, "augment", rank))
    augment_pipe = AugmentPipe(args.augment, augment_generator) if args.augment > 0 else None
    # fused: one kernel for all tensors, on GPUs and (torch >= 2.4) CPUs: on this project's 2-core CPU, 5x faster
    # than the per-tensor loop for the 56M parameters of CIFAR-10 DDPM++ (issue 29).
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    stream = InfiniteSampler(len(data), args.seed, rank, world_size)
    # What the machinery (training states, snapshots, ticks; below) reads and restores.
    run = types.SimpleNamespace(args=args, device=device, data=data, class_name=class_name, net_kwargs=net_kwargs,
                                batch_gpu=batch_gpu, rounds=rounds, net=net, ema=ema, phema=phema, optimizer=optimizer,
                                scaler=scaler, stream=stream, augment_generator=augment_generator, preview=preview)
    cur_nimg = restore(run, resume[0]) if resume else 0
    ddp, autocast = accelerate(net, args, device, world_size)
    if rank == 0:
        begin_run(run, resume, cur_nimg)

    total_nimg = round(args.duration * 1e6)
    stop_nimg = min(total_nimg, round(args.stop_kimg * 1e3)) if args.stop_kimg else total_nimg
    progress = Progress(run, cur_nimg, total_nimg)
    schedule = getattr(loss_fn, "schedule", lambda cur_nimg: None)
    while cur_nimg < stop_nimg:
        schedule(cur_nimg)
        # One step on args.batch images: `rounds` micro-batches per rank, gradients averaged over ranks on the last.
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(rounds):
            with (ddp.no_sync() if world_size > 1 and round_idx < rounds - 1 else contextlib.nullcontext()):
                images, labels = data.batch(stream.next(batch_gpu))
                y = images.to(device).to(torch.float32) / 127.5 - 1        # pixels in [-1, 1]
                y = y.contiguous(memory_format=torch.channels_last) if args.channels_last else y
                with autocast():
                    # Eq. 2, weighted as in Table 1 (05's loss): draw sigma ~ p_train (EDM: ln sigma ~
                    # N(P_mean, P_std^2)), augment y, add n ~ N(0, sigma^2 I); per pixel the loss is
                    # lambda(sigma) |D(y + n; sigma) - y|^2.
                    loss = loss_fn(net=ddp, images=y, labels=labels.to(device), augment_pipe=augment_pipe)
                progress.add_loss(loss)
                scaler.scale(loss.sum() / (batch_gpu * rounds)).backward()   # summed per image, mean over the batch

        # Adam with the learning rate ramped up linearly (Table 7).
        lr = learning_rate(cur_nimg, args.lr, args.lr_rampup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.unscale_(optimizer)
        progress.nonfinite += sanitize_gradients(net)
        scaler.step(optimizer)
        scaler.update()

        # The exponential moving average of the weights, its half-life counted in images; --phema's averages
        # after step t = cur_nimg / batch + 1 (EDM2 Eq. 127).
        update_ema(ema, net, ema_beta(cur_nimg, args.batch, args.ema))
        for sigma_rel, average in phema.items():
            update_ema(average, net, ch11.phema_beta(cur_nimg // args.batch + 1, ch11.phema_gamma(sigma_rel)))
        cur_nimg += args.batch

        # Bookkeeping: a tick every --tick kimg; every --snap kimg and at the end also a network
        # snapshot, a preview grid and the training state to resume from.
        snap_due = cur_nimg >= stop_nimg or crossed(cur_nimg, args.batch, args.snap)
        if snap_due or crossed(cur_nimg, args.batch, args.tick):
            stats = progress.tick(cur_nimg, lr)
            if snap_due:
                stats["rank_digests"] = save_snapshot(run, cur_nimg)
            progress.log(stats)
    progress.bar.close()
    return cur_nimg / 1e3


# ----------------------------------------------------------------------------
# What `train` calls: the network and the loss in the official configuration vocabulary (train.py of
# NVlabs/edm), the schedules of Table 7, the EMA and the gradient check.

ARCHS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECONDS = {"vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss"), "edm": ("EDMPrecond", "EDMLoss"),
            "fm": ("FMPrecond", "FMLoss")}
# The log-normal p_train of EDM (Table 1) and of flow matching (SD3's logit-normal t, 05's FMLoss): (P_mean, P_std).
P_TRAIN = {"edm": (-1.2, 1.2), "fm": (0.0, 1.0)}


def network_config(args, data):
    """(class_name, kwargs) exactly as the official constructors take them (06's from_official_config)."""
    kwargs = dict(img_resolution=data.resolution, img_channels=data.channels, label_dim=data.label_dim,
                  use_fp16=False, **ARCHS[args.arch], dropout=args.dropout)   # mixed precision: autocast instead
    chosen = dict(model_channels=args.cbase, channel_mult=args.cres, num_blocks=args.blocks, attn_resolutions=args.attn)
    kwargs.update({name: value for name, value in chosen.items() if value is not None})   # else the arch's own
    if args.augment > 0:
        kwargs["augment_dim"] = len(AUGMENT_LABELS)
    if args.label_dropout > 0:
        kwargs["label_dropout"] = args.label_dropout    # 06's drop_labels: a zero class vector with probability p
    if args.precond == "edm":
        kwargs["sigma_data"] = args.sigma_data          # in the snapshot's configuration: 08 samples with it too
    if args.loss_weighting == "learned":
        kwargs["logvar_channels"] = 128                 # EDM2's u(sigma), part of the network (05's Uncertainty)
    return PRECONDS[args.precond][0], kwargs


def loss_function(args):
    """05's loss of Table 1 for --precond; EDM's and FM's with this run's P_mean and P_std (EDM's: sigma_data) and
    --loss-weighting."""
    learned = args.loss_weighting == "learned"
    if args.precond == "edm":
        return ch05.EDMLoss(P_mean=args.P_mean, P_std=args.P_std, sigma_data=args.sigma_data, learned=learned)
    if args.precond == "fm":
        return ch05.FMLoss(P_mean=args.P_mean, P_std=args.P_std, learned=learned)
    return getattr(ch05, PRECONDS[args.precond][1])()


def learning_rate(cur_nimg, lr, rampup_mimg):
    """Linear warm-up from 0 to lr over the first rampup_mimg million images, then constant."""
    return lr * min(cur_nimg / max(rampup_mimg * 1e6, 1e-8), 1)


def ema_beta(cur_nimg, batch_size, halflife_mimg, rampup_ratio=0.05):
    """Per-step EMA decay: the average forgets half its weight every `halflife` images. Early on the
    half-life is capped at rampup_ratio x images seen, so the random initial weights fade fast."""
    halflife_nimg = min(halflife_mimg * 1e6, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema, net, beta):
    """ema <- beta * ema + (1 - beta) * net, all parameters in a few multi-tensor kernels (not one per tensor)."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)


def sanitize_gradients(net):
    """As the official loop: NaN/Inf entries are replaced, not allowed to poison Adam. Returns 'any found'.

    The check is one multi-tensor max-|g| (NaN and Inf both make it non-finite; a sum of squares could overflow
    on large finite gradients) instead of ~3 kernels per tensor; the repair, one kernel per tensor, runs only
    when something was found -- at the price of one device-to-host sync per step."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    found = ~torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
    if found:
        for g in grads:
            torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
    return found


# ----------------------------------------------------------------------------
# Non-leaking augmentation (App. C.4, F.2): what the loss applies to y before adding noise; the network is
# told which augmentation it sees (its augment labels), so sampling with labels 0 gives un-augmented images.
# The transforms of the paper's CIFAR-10 runs. The geometric maths (padding, 2x up/down-sampling with a
# symlet-6 low-pass, coordinate conventions) follow StyleGAN2-ADA's pipeline, which the official EDM code
# reuses. 05's losses call the pipe (`augment_pipe=`) on the clean images.

SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]

AUGMENT_LABELS = ["xflip", "yflip", "scale", "rotate_cos_minus_1", "rotate_sin",
                  "aniso_w_cos", "aniso_w_sin", "translate_x", "translate_y"]


def translate2d(tx, ty):
    tx, ty = torch.as_tensor(tx, dtype=torch.float32), torch.as_tensor(ty, dtype=torch.float32)
    o, z = torch.ones_like(tx), torch.zeros_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], -1).reshape(*tx.shape, 3, 3)


def scale2d(sx, sy):
    sx, sy = torch.as_tensor(sx, dtype=torch.float32), torch.as_tensor(sy, dtype=torch.float32)
    o, z = torch.ones_like(sx), torch.zeros_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], -1).reshape(*sx.shape, 3, 3)


def rotate2d(theta):
    c, s = theta.cos(), theta.sin()
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*c.shape, 3, 3)


class AugmentPipe:
    """Images in, (augmented images, 9 augment labels) out; each transform happens with probability p.

    05's losses call it on the clean images y (`augment_pipe=`) and hand its labels to the network.
    The keyword arguments are per-transform probability multipliers. The paper's
    CIFAR-10 setting is the default: xflip=1e8 makes every image a fair coin flip
    (an always-on 50% mirror), the others fire with probability p each. Labels are
    in the official order (AUGMENT_LABELS), zero when a transform did not fire.
    Random numbers come from `generator` (its state is part of a checkpoint).
    """

    def __init__(self, p, generator=None, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                 scale_std=0.2, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125):
        self.p = p
        self.generator = generator
        self.xflip, self.yflip, self.scale, self.rotate_frac = xflip, yflip, scale, rotate_frac
        self.aniso, self.translate_frac = aniso, translate_frac
        self.scale_std, self.aniso_std = scale_std, aniso_std
        self.aniso_rotate_prob, self.translate_frac_std = aniso_rotate_prob, translate_frac_std

    def __call__(self, images):
        # Geometry in float32 whatever precision the caller trains in: 07 runs the loss (and so this) under
        # autocast, which would otherwise compose the matrices and resample the pixels in bf16/fp16.
        with torch.autocast(images.device.type, enabled=False):
            return self.augment(images.to(torch.float32))

    def augment(self, images):
        N, C, H, W = images.shape
        dev, g = images.device, self.generator
        rand = lambda *shape: torch.rand(shape, device=dev, generator=g)
        randn = lambda *shape: torch.randn(shape, device=dev, generator=g)
        fires = lambda multiplier, *shape: rand(*shape) < multiplier * self.p
        labels = []

        # Pixel blits: exact mirror images, label 1 = mirrored.
        for multiplier, dim in ((self.xflip, 3), (self.yflip, 2)):
            w = torch.randint(2, [N, 1, 1, 1], device=dev, generator=g)
            w = torch.where(fires(multiplier, N, 1, 1, 1), w, 0)
            images = torch.where(w == 1, images.flip(dim), images)
            labels.append(w)

        # Geometric transforms, composed into one matrix G_inv that maps each output
        # pixel (coordinates centred on the image) to where it samples the input.
        G_inv = torch.eye(3, device=dev).expand(N, 3, 3)

        w = randn(N)                                                     # isotropic scale 2^(w * std)
        w = torch.where(fires(self.scale, N), w, 0)
        s = (w * self.scale_std).exp2()
        G_inv = G_inv @ scale2d(1 / s, 1 / s).to(dev)
        labels.append(w)

        w = (rand(N) * 2 - 1) * math.pi                                  # rotation by a uniform angle
        w = torch.where(fires(self.rotate_frac, N), w, 0)
        G_inv = G_inv @ rotate2d(w)
        labels += [w.cos() - 1, w.sin()]

        w, r = randn(N), (rand(N) * 2 - 1) * math.pi                     # stretch by 2^(w*std) along angle r
        w = torch.where(fires(self.aniso, N), w, 0)
        r = torch.where(rand(N) < self.aniso_rotate_prob, r, 0)
        s = (w * self.aniso_std).exp2()
        G_inv = G_inv @ rotate2d(-r) @ scale2d(1 / s, s).to(dev) @ rotate2d(r)
        labels += [w * r.cos(), w * r.sin()]

        w = randn(2, N)                                                  # shift by w * std * image size
        w = torch.where(fires(self.translate_frac, 1, N), w, 0)
        G_inv = G_inv @ translate2d(-w[0] * W * self.translate_frac_std, -w[1] * H * self.translate_frac_std).to(dev)
        labels += [w[0], w[1]]

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        moved = (labels[:, 2:] != 0).any(1)            # images with a geometric transform to resample
        if moved.any():
            images = images.clone()
            images[moved] = resample(images[moved], G_inv[moved])
        return images, labels


def resample(images, G_inv):
    """out(p) = in(G_inv p) for each image, band-limited: reflect-pad, 2x upsample, bilinear warp, 2x downsample."""
    N, C, H, W = images.shape
    dev, dtype = images.device, images.dtype
    taps = torch.tensor(SYM6, dtype=dtype, device=dev)
    extra = len(SYM6) // 4                     # border kept around the crop so filter tails stay outside it

    # 1. Reflect-pad enough that every output pixel reads real (mirrored) content.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], device=dev)
    reach = (G_inv @ corners)[:, :2].permute(1, 0, 2).flatten(1)            # [xy, N * 4]
    margin = torch.cat([(-reach).amax(1), reach.amax(1)])                   # left, top, right, bottom
    margin = margin + torch.tensor([2 * extra - cx, 2 * extra - cy] * 2, device=dev)
    margin = margin.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, device=dev))
    x0, y0, x1, y1 = margin.ceil().to(torch.int64).tolist()
    images = F.pad(images, [x0, x1, y0, y1], mode="reflect")
    G_inv = translate2d((x0 - x1) / 2, (y0 - y1) / 2).to(dev) @ G_inv      # the padding moved the centre

    # 2. Upsample 2x: zero insertion + low-pass, one axis at a time (a strided transposed conv).
    kernel = taps.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    images = F.conv_transpose2d(images, kernel, stride=(1, 2), padding=(0, 5), groups=C)
    images = F.conv_transpose2d(images, kernel.transpose(2, 3), stride=(2, 1), padding=(5, 0), groups=C)
    G_inv = scale2d(2, 2).to(dev) @ G_inv @ scale2d(0.5, 0.5).to(dev)
    G_inv = translate2d(-0.5, -0.5).to(dev) @ G_inv @ translate2d(0.5, 0.5).to(dev)

    # 3. Warp: affine_grid works in [-1, 1] coordinates of the output and input frames.
    out_h, out_w = (H + 2 * extra) * 2, (W + 2 * extra) * 2
    in_h, in_w = images.shape[2:]
    G_inv = scale2d(2 / in_w, 2 / in_h).to(dev) @ G_inv @ scale2d(out_w / 2, out_h / 2).to(dev)
    grid = F.affine_grid(G_inv[:, :2, :], [N, C, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # 4. Downsample 2x with the same low-pass and crop back to H x W.
    images = F.conv2d(images, kernel, stride=(1, 2), padding=(0, 5), groups=C)[:, :, :, extra:-extra]
    images = F.conv2d(images, kernel.transpose(2, 3), stride=(2, 1), padding=(5, 0), groups=C)
    return images[:, :, extra:-extra, :]


# ----------------------------------------------------------------------------
# Data: images become a uint8 tensor [N, C, H, W] and integer class labels (or none): CIFAR-10, the built-in
# shapes, or a folder/zip of images (08's ImageFolder, the one reader of image folders: 08's FID statistics and
# tools/nearest.py read them the same way).

DATA_DIR = os.path.join("out", "data")       # where CIFAR-10's tarball is looked for (07 and 08)


def load_cifar10(data_dir=None):
    """The 50,000 CIFAR-10 training images (uint8 [50000, 3, 32, 32]) and classes (int64 [50000])."""
    import torchvision
    data_dir = data_dir or DATA_DIR
    try:
        dataset = torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True)
    except Exception as error:   # offline: urllib/socket/integrity errors all end here
        raise OSError(f"CIFAR-10 is not in {data_dir!r} and could not be downloaded ({type(error).__name__}); "
                      f"put cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
                      f"into {data_dir!r}") from None
    return torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous(), np.asarray(dataset.targets, np.int64)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHAPES = ["disc", "square", "triangle", "cross"]   # the built-in data: a class per shape, on dark backgrounds


def make_shapes_dataset(n, resolution, seed=0, supersample=4):
    """n procedurally drawn RGB images (uint8 [n, 3, R, R]) and their class (index into SHAPES): a random saturated
    colour, size and position each; edges anti-aliased by drawing `supersample` times larger and averaging down."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)
    classes = torch.randint(len(SHAPES), [n], generator=g)
    size = resolution * (0.22 + 0.12 * u(n, 1, 1))                        # half-width in pixels
    cx = resolution / 2 + (u(n, 1, 1) - 0.5) * (resolution - 2.6 * size)   # keep the shape inside
    cy = resolution / 2 + (u(n, 1, 1) - 0.5) * (resolution - 2.6 * size)
    s = resolution * supersample
    coords = (torch.arange(s) + 0.5) / supersample
    dx, dy = coords.view(1, 1, s) - cx, coords.view(1, s, 1) - cy
    masks = torch.stack([
        dx ** 2 + dy ** 2 <= size ** 2,                                                        # disc
        torch.maximum(dx.abs(), dy.abs()) <= 0.8 * size,                                       # square
        (dy <= 0.8 * size) & (dx.abs() * 1.8 <= (dy + size)),                                 # triangle, apex up
        ((dx.abs() <= 0.3 * size) & (dy.abs() <= size)) | ((dy.abs() <= 0.3 * size) & (dx.abs() <= size)),  # cross
    ])[classes, torch.arange(n)].to(torch.float32)
    masks = F.avg_pool2d(masks[:, None], supersample)                      # [n, 1, R, R] coverage
    hue = u(n) * 6                                                          # saturated colour from a hue
    colour = 0.35 + 0.65 * torch.stack([(hue - k).remainder(6).sub(3).abs().sub(1).clamp(0, 1) for k in (0, 4, 2)], 1)
    background = 0.05 + 0.15 * u(n, 1)                                      # dark grey
    images = masks * colour.view(n, 3, 1, 1) + (1 - masks) * background.view(n, 1, 1, 1)
    return (images * 255).round().to(torch.uint8), classes.numpy()


class TrainingSet:
    """Training images in memory (uint8 [N, C, H, W], decoded once), one-hot labels [N, label_dim]
    (label_dim 0: none) and class names; with xflip, index N + i is image i mirrored."""

    def __init__(self, name, images, labels, class_names, xflip):
        self.name, self.images, self.labels, self.class_names, self.xflip = name, images, labels, class_names, xflip
        self.channels, self.resolution, self.label_dim = images.shape[1], images.shape[2], labels.shape[1]

    def __len__(self):
        return len(self.images) * (2 if self.xflip else 1)

    def batch(self, indices):
        raw, flip = indices % len(self.images), (indices >= len(self.images)).view(-1, 1, 1, 1)
        return torch.where(flip, self.images[raw].flip(3), self.images[raw]), self.labels[raw]


def load_dataset(args):
    """--data (cifar10 | shapes | a folder/zip) -> TrainingSet, checked against the network it will feed."""
    if args.data == "cifar10":   # one process per node downloads and extracts; the others wait, then read it
        (images, labels), name, names = common.rank0_first(load_cifar10, args.data_dir), "cifar10", CIFAR10_CLASSES
    elif args.data == "shapes":
        (images, labels), names = make_shapes_dataset(4096, args.resolution or 16), SHAPES
        name = f"shapes{images.shape[2]}"
    else:
        ch08 = common.load("08_evaluate_fid")
        folder = ch08.ImageFolder(args.data, args.resolution if args.resize else None)
        images, labels, names = decode_once_per_node(folder, args.outdir), folder_labels(folder), None
        name = os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]
        if folder.resized and common.get_rank() == 0:
            print(f"{len(folder.resized)} of {len(folder)} images center-cropped and resized to "
                  f"{args.resolution}x{args.resolution} (LANCZOS, as the official dataset_tool.py)")
        ch08.note_alpha(folder)
    n, _, h, w = images.shape
    levels = len(args.cres or ([1, 2, 3, 4] if args.arch == "adm" else [2, 2, 2]))
    if h != w or h % 2 ** (levels - 1) or h != (args.resolution or h):
        raise ValueError(f"the images are {w}x{h}; the {levels}-level U-Net needs square images, a size divisible by "
                         f"2^{levels - 1}" + f" and equal to --resolution {args.resolution}" * bool(args.resolution)
                         + ("; pass --resolution R to center-crop and resize them" if args.data not in
                            ("cifar10", "shapes") and not (args.resolution and args.resize) else ""))
    if args.cond and labels is None:
        raise ValueError(f"--cond needs labels, and {args.data!r} has none (dataset.json or class sub-folders)")
    if args.cond and labels.min() < 0:
        raise ValueError(f"class labels must be non-negative integers; {args.data!r} has {labels.min()}")
    onehot = F.one_hot(torch.as_tensor(labels)).to(torch.float32) if args.cond else torch.zeros([n, 0])
    return TrainingSet(name, images, onehot, names or [f"class {k}" for k in range(onehot.shape[1])], args.xflip)


def folder_labels(folder):
    """int64 [N] class indices of an 08 ImageFolder's images, or None: from dataset.json (the official layout,
    {"labels": [["00000/img00000000.png", 6], ...]}), else from one sub-folder per class (in sorted order)."""
    if "dataset.json" in folder.files:
        labels = dict(json.loads(folder.data("dataset.json")).get("labels") or [])
        missing = [n for n in folder.names if n not in labels]
        if labels and missing:
            raise ValueError(f"dataset.json in {folder.path!r} has no label for {missing[0]!r}")
        return np.asarray([labels[n] for n in folder.names], np.int64) if labels else None
    folders = [n.split("/")[0] if "/" in n else None for n in folder.names]
    if None in folders or len(set(folders)) < 2:
        return None
    return np.unique(folders, return_inverse=True)[1].astype(np.int64)   # index of the sorted folder name


def decode_once_per_node(folder, run_dir):
    """Every image of `folder` as uint8 [N, C, H, W]. Under torchrun each node's first process decodes them
    once into a .npy file in the run folder that the node's other processes memory-map (copy-on-write: the
    pages are shared), so a node holds one decoded copy, not one per GPU; the file's name goes once all have
    mapped it (the mapping outlives the name)."""
    if common.get_world_size() == 1:
        return folder.batch(range(len(folder)))
    # GROUP_RANK is torchrun's node rank: one file per node, even in a run folder that all nodes share
    cache = os.path.join(run_dir, f"images-node{os.environ.get('GROUP_RANK', '0')}.npy")
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0

    def decode_or_map():
        if first:
            images = folder.batch(range(len(folder))).numpy()   # bad input fails here, before anything is written
            with common.atomic_open(cache) as f:
                np.save(f, images)
        return torch.from_numpy(np.load(cache, mmap_mode="c"))
    images = common.rank0_first(decode_or_map)
    torch.distributed.barrier()
    if first:
        os.remove(cache)
    return images


def data_std(data, max_images=10000):
    """The data's per-pixel standard deviation in [-1, 1] (on up to max_images evenly spread images): EDM's
    sigma_data, which c_skip, c_out and c_in need to give the network unit-variance inputs and targets (Sec. 5)."""
    indices = torch.linspace(0, len(data) - 1, min(len(data), max_images)).round().long()
    return (data.batch(indices)[0].to(torch.float64) / 127.5 - 1).std().item()


# The data stream: one endless shuffled sequence of dataset indices, shared by all ranks.

class InfiniteSampler:
    """Epoch e of the stream is a permutation drawn from (seed, e); rank r of R reads entries r, r+R, r+2R, ...
    Its whole state is `position` (entries read by all ranks together), so a resumed run -- even one with
    a different number of ranks -- reads exactly the images the uninterrupted run would have read."""

    def __init__(self, size, seed, rank=0, num_ranks=1, position=0):
        self.size, self.seed, self.rank, self.num_ranks, self.position = size, seed, rank, num_ranks, position
        self._perms = {}

    def permutation(self, epoch):
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}   # keep one epoch back
            self._perms[epoch] = torch.randperm(self.size, generator=generator)
        return self._perms[epoch]

    def next(self, batch):
        """This rank's next `batch` indices; all ranks advance together by batch * num_ranks."""
        stream = self.position + self.rank + self.num_ranks * torch.arange(batch)   # increasing: epochs in order
        self.position += batch * self.num_ranks
        epochs = stream // self.size
        return torch.cat([self.permutation(e)[stream[epochs == e] % self.size] for e in epochs.unique().tolist()])


def derive_seed(*parts):
    """An independent 63-bit seed for each (run seed, purpose, ...) tuple."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------
# Machinery (none of it changes the maths above): the batch split, precision and DDP, the run folder,
# ticks, snapshots with rank digests and previews, training states and resume.

def split_batch(batch, batch_gpu, world_size):
    """--batch = processes x rounds x --batch-gpu. Returns (batch_gpu, rounds)."""
    batch_rank = batch // world_size
    batch_gpu = batch_gpu or batch_rank
    if batch % world_size or batch_gpu > batch_rank or batch_rank % batch_gpu:
        raise ValueError(f"--batch {batch} must be divisible by processes x --batch-gpu ({world_size} x {batch_gpu})")
    return batch_gpu, batch_rank // batch_gpu


def crossed(cur_nimg, step, kimg):
    """Did the last step of `step` images cross a multiple of `kimg`?"""
    interval = max(round(kimg * 1e3), 1)
    return cur_nimg // interval > (cur_nimg - step) // interval


def accelerate(net, args, device, world_size):
    """(ddp, autocast): the DDP wrapper of net (net itself in one process) and the autocast context."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32   # the paper: true fp32
    torch.backends.cudnn.benchmark = True   # fastest kernels; bit-exact GPU resumes would need deterministic ones
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else net
    ddp = torch.compile(ddp) if args.compile else ddp     # the same weights: net, ema and snapshots are unchanged
    return ddp, lambda: torch.autocast(device.type, common.PRECISIONS[args.precision], args.precision != "fp32")


def begin_run(run, resume, cur_nimg):
    """training_options.json, reals.png (new runs) and one line saying what is trained."""
    args, data, world_size, measured_std = run.args, run.data, common.get_world_size(), data_std(run.data)
    common.out_dir(__file__, args.outdir)           # one clear line if --outdir is (inside) a file
    common.write_json(dict(vars(args), world_size=world_size, dataset=data.name, dataset_size=len(data),
                           data_std=measured_std, class_names=data.class_names,
                           network=dict(class_name=run.class_name, kwargs=run.net_kwargs), batch_gpu=run.batch_gpu,
                           accumulation_rounds=run.rounds), os.path.join(args.outdir, OPTIONS))
    if resume is None:
        save_grid(data.batch(torch.arange(64) % len(data))[0] / 127.5 - 1,
                  os.path.join(args.outdir, "reals.png"), f"{data.name}: training images 0-63")
    print(f"{f'resuming {resume[1]} at {cur_nimg / 1e3:g} kimg' if resume else 'new run'} -> {args.outdir}\n"
          f"{data.name}: {len(data)} images {data.resolution}x{data.resolution}x{data.channels}, {data.label_dim} "
          f"classes; {run.class_name}/{run.net_kwargs['model_type']} {sum(p.numel() for p in run.net.parameters()):,} "
          f"parameters; {world_size} process(es) on {run.device}; batch {args.batch} = {world_size}x{run.rounds}x"
          f"{run.batch_gpu}\ndata: per-pixel std {measured_std:.3f} in [-1, 1]" +
          (f"; sigma_data {args.sigma_data:g} in use" if args.precond == "edm" else ""), flush=True)
    if args.precond == "edm" and abs(measured_std / args.sigma_data - 1) > 0.25:
        print(f"warning: the data's std {measured_std:.3f} differs from sigma_data {args.sigma_data:g} by more than "
              f"25 %; pass --sigma-data {measured_std:.2f} so that the network's inputs and targets have unit "
              f"variance (chapter 05)", file=sys.stderr, flush=True)


OPTIONS = "training_options.json"


def read_run_options(folder):
    """The options, data set and network a 07 run recorded in `folder` (its training_options.json), or {}."""
    path = os.path.join(folder, OPTIONS)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by the precision the matmuls and
# convolutions run in ("tf32": fp32 with --tf32). First matching name wins; an unknown GPU gets no MFU.
PEAK_TFLOPS = [
    (("NVL",), {}),                                                          # H100/H200 NVL: lower clocks, not listed
    (("H100", "PCIe"), dict(fp32=51, tf32=378, bf16=756, fp16=756)),
    (("H100", "HBM3"), dict(fp32=67, tf32=495, bf16=989, fp16=989)),       # SXM: "NVIDIA H100 80GB HBM3"
    (("H200",), dict(fp32=67, tf32=495, bf16=989, fp16=989)),
    (("A100",), dict(fp32=19.5, tf32=156, bf16=312, fp16=312)),
    (("V100",), dict(fp32=15.7, fp16=125)),
]


def peak_tflops(device, precision, tf32):
    """The device's peak TFLOP/s for `precision` (fp32 | bf16 | fp16), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32 else precision
    return next((peaks.get(key) for parts, peaks in PEAK_TFLOPS if all(p in name for p in parts)), None)


class Progress:
    """Per tick (rank 0): loss mean/std over all ranks (summed on the device), speed, achieved TFLOP/s per
    process and, on a GPU of known peak, MFU (model FLOPs utilization), memory -> stats.jsonl, a line."""

    def __init__(self, run, cur_nimg, total_nimg):
        self.path, self.device, self.total = os.path.join(run.args.outdir, "stats.jsonl"), run.device, total_nimg
        # FLOPs of one training image: forward (06's count, 2 per multiply-add) + backward (~2x forward)
        self.flops_per_image = 3 * ch06.size_and_flops(run.class_name, run.net_kwargs)[1]
        self.peak = peak_tflops(run.device, run.args.precision, run.args.tf32)
        self.bar = tqdm.tqdm(total=total_nimg, initial=cur_nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                             disable=common.get_rank() != 0 or not sys.stderr.isatty())   # a bar on a terminal only
        self.reset(cur_nimg)

    def reset(self, cur_nimg):
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)    # sum, sum of squares, count
        self.nonfinite = torch.zeros([], device=self.device)
        self.start_time, self.start_nimg = time.time(), cur_nimg

    def add_loss(self, loss):
        per_image = loss.detach().double().mean(dim=(1, 2, 3))
        self.bar.update(len(per_image) * common.get_world_size())
        self.sums += torch.stack([per_image.sum(), per_image.square().sum(), per_image.new_tensor(len(per_image))])

    def tick(self, cur_nimg, lr):
        sums = self.sums.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        total, squares, count = sums.tolist()
        mean, seconds, nimg = total / count, time.time() - self.start_time, cur_nimg - self.start_nimg
        memory = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB
        tflops = nimg / seconds / common.get_world_size() * self.flops_per_image / 1e12
        return dict(kimg=cur_nimg / 1e3, loss_mean=mean, loss_std=math.sqrt(max(squares / count - mean ** 2, 0)),
                    lr=lr, images_per_sec=nimg / seconds, sec_per_kimg=seconds / nimg * 1e3, tflops_per_gpu=tflops,
                    **(dict(mfu=tflops / self.peak) if self.peak else {}),
                    nonfinite_grad_steps=int(self.nonfinite), memory_gb=memory / 2 ** 30, timestamp=time.time())

    def log(self, stats):
        if common.get_rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(stats) + "\n")
            tqdm.tqdm.write(f"kimg {stats['kimg']:8.3f}/{self.total / 1e3:g}  loss {stats['loss_mean']:.4f} +- "
                            f"{stats['loss_std']:.4f}  lr {stats['lr']:.2e}  {stats['images_per_sec']:.0f} img/s  "
                            f"{stats['tflops_per_gpu']:.3g} TFLOP/s/GPU  " +
                            (f"MFU {stats['mfu']:.1%}  " if "mfu" in stats else "") +
                            f"{stats['memory_gb']:.2f} GB" + "  snapshot" * ("rank_digests" in stats))
            sys.stdout.flush()   # tqdm.write: above the bar on a terminal; one plain line in a log file
        self.reset(round(stats["kimg"] * 1e3))


def save_snapshot(run, cur_nimg):
    """Network snapshot + preview + training state (+ --phema snapshots). Returns every rank's weight digest
    (equal, or we stop)."""
    digest = lambda module: hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in module.parameters()))
    digests = common.gather("/".join(digest(m).hexdigest() for m in [run.net, run.ema, *run.phema.values()]))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the weights at {cur_nimg} images: {digests}")
    rngs = common.gather(dict(torch=torch.get_rng_state(), augment=run.augment_generator.get_state(),
                              cuda=torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None))
    if common.get_rank() == 0:
        kimg, run_dir = f"{cur_nimg // 1000:06d}", run.args.outdir
        ch06.save_network(run.ema, os.path.join(run_dir, f"network-snapshot-{kimg}.pt"))
        save_preview(run.ema, os.path.join(run_dir, f"preview-{kimg}.png"), run.device, cur_nimg, run.data.class_names,
                     run.preview)
        for sigma_rel, average in run.phema.items():
            ch06.save_network(average, common.load("11_post_hoc_ema").phema_path(run_dir, sigma_rel, cur_nimg))
        write_state(dict(net=run.net.state_dict(), ema=run.ema.state_dict(), optimizer=run.optimizer.state_dict(),
                         phema=[average.state_dict() for average in run.phema.values()],
                         scaler=run.scaler.state_dict(), cur_nimg=cur_nimg, stream_position=run.stream.position,
                         rng=rngs, args=vars(run.args)), run_dir)
    return digests


# Training states: the new one replaces the old only once complete on disk; the previous good one is kept.
STATE, PREVIOUS = "training-state.pt", "training-state-prev.pt"


def write_state(state, run_dir):
    """training-state.pt <- state; the old one becomes training-state-prev.pt only once the new one is complete."""
    path = os.path.join(run_dir, STATE)
    with common.atomic_open(path) as f:           # a temporary file, renamed to `path` at the end of the block
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())                        # a crash before the renames leaves both old files intact
        if os.path.exists(path):
            os.replace(path, os.path.join(run_dir, PREVIOUS))


def read_state(path, fallback=None):
    """(state, path) via torch.load (weights-only safe); if `path` is unreadable, warn and read `fallback`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as error:   # a truncated or damaged file can raise many kinds
        if fallback is None or not os.path.exists(fallback):
            raise ValueError(f"cannot read training state {path!r} ({type(error).__name__}): it is damaged; "
                             f"resume from another state or start a new --outdir") from None
        print(f"warning: {path} is unreadable ({type(error).__name__}); resuming from the previous good state "
              f"{fallback}", file=sys.stderr)
        return read_state(fallback)


def find_resume(args):
    """(state, path) to continue from, or None for a new run; the state must fit the options."""
    latest, previous = os.path.join(args.outdir, STATE), os.path.join(args.outdir, PREVIOUS)
    found = os.path.exists(latest) or os.path.exists(previous)
    same_on_every_rank("a training state" if found else "none", args.outdir)   # before any rank can stop alone
    if args.resume is None and found:
        raise ValueError(f"{args.outdir!r} already holds a training run; pass --resume auto to continue it "
                         f"or choose another --outdir")
    if args.resume is None or (args.resume == "auto" and not found):
        return None
    if args.resume == "auto":
        resume = read_state(latest, fallback=previous) if os.path.exists(latest) else read_state(previous)
    elif os.path.isfile(args.resume):
        resume = read_state(args.resume)
    else:
        raise FileNotFoundError(f"--resume {args.resume!r}: no such file")
    same_on_every_rank(f"{resume[0]['cur_nimg']} images", args.outdir)
    saved = resume[0]["args"]
    changed = sorted(k for k, v in vars(args).items() if k not in RESUMABLE and saved.get(k, v) != v)
    if changed:
        raise ValueError("cannot resume with different " + ", ".join(
            f"--{k.replace('_', '-')} ({saved[k]} -> {getattr(args, k)})" for k in changed))
    return resume


def same_on_every_rank(seen, run_dir):
    """Raise on every rank unless all ranks see the same `seen` in the run folder: only rank 0 writes
    it, so on several nodes it must be one shared folder, or a node would start over while others resume."""
    views = common.gather(seen)
    if len(set(views)) > 1:
        raise ValueError(f"the processes see different training runs in --outdir {run_dir!r} (" + ", ".join(
            f"rank {r}: {v}" for r, v in enumerate(views)) + "); on several nodes --outdir must be one shared "
            "folder that every node reads (a network file system)")


def restore(run, state):
    """Load a training state into this rank's objects and random streams; returns the images seen. (--phema's
    averages in --phema's order, which find_resume keeps unchanged.)"""
    rank, world_size, device = common.get_rank(), common.get_world_size(), run.device
    for module, key in [(run.net, "net"), (run.ema, "ema"), (run.optimizer, "optimizer"), (run.scaler, "scaler")]:
        module.load_state_dict(state[key])
    for average, saved in zip(run.phema.values(), state["phema"]):
        average.load_state_dict(saved)
    run.stream.position = state["stream_position"]
    saved_on = "cuda" if state["rng"][0]["cuda"] is not None else "cpu"
    if len(state["rng"]) == world_size and saved_on == device.type:
        torch.set_rng_state(state["rng"][rank]["torch"])
        run.augment_generator.set_state(state["rng"][rank]["augment"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
    else:   # another number of ranks, or another device's generator type: fresh streams, still deterministic
        why = f"{len(state['rng'])} ranks' run on {world_size}" if saved_on == device.type else \
            f"a {saved_on} run on {device.type} (the generators differ)"
        print(f"warning: resuming {why}; random streams are re-seeded", file=sys.stderr)
        torch.manual_seed(derive_seed(run.args.seed, "rank", rank, state["cur_nimg"]))
        run.augment_generator.manual_seed(derive_seed(run.args.seed, "augment", rank, state["cur_nimg"]))
    return state["cur_nimg"]


def save_grid(x, path, title, row_labels=None, ncol=8, min_width=512, column_labels=None):
    """Save a batch [N, C, H, W] (float in [-1, 1], or uint8) as a titled grid of `ncol` columns (N divisible by
    ncol), each pixel an integer-sized block so that tiny images stay sharp; rows and columns may be labelled."""
    from matplotlib.figure import Figure
    images = x.cpu() if x.dtype == torch.uint8 else common.to_uint8(x).permute(0, 3, 1, 2)
    images = F.pad(images, [1, 0, 1, 0], value=255)                # 1-pixel white gaps
    n, c, h, w = images.shape
    grid = images.reshape(n // ncol, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(n // ncol * h, ncol * w, c)
    inches = [size * -(-min_width // (ncol * w)) / 100 for size in grid.shape[1::-1]]   # at 100 dpi
    left = max(1.2, 0.09 * max(map(len, row_labels))) if row_labels else 0.1   # room for the row labels
    top = 1.0 if column_labels else 0.5                               # room for the title (and column labels)
    fig = Figure(figsize=(inches[0] + left + 0.1, inches[1] + top), dpi=100)
    ax = fig.add_axes([left / fig.get_figwidth(), 0.05 / fig.get_figheight(),
                       inches[0] / fig.get_figwidth(), inches[1] / fig.get_figheight()])
    ax.imshow(grid.squeeze(2).numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / fig.get_figheight(), va="top")
    ax.set_xticks([(j + 0.5) * w for j in range(len(column_labels or []))], column_labels or [], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([(r + 0.5) * h for r in range(len(row_labels or []))], row_labels or [])
    ax.tick_params(length=0, labelsize=10)
    fig.savefig(path)


@torch.no_grad()
def save_preview(ema, path, device, cur_nimg, class_names, sample):
    """Seeds 0..63 (row r: class r mod label_dim) through `sample` (train's: 04's deterministic sampler, 18 steps,
    35 NFE), as an enlarged, labelled 8x8 grid."""
    rnd = common.StackedRandomGenerator(device, range(64))
    latents = rnd.randn([64, ema.img_channels, ema.img_resolution, ema.img_resolution], device=device)
    classes = torch.arange(64, device=device) // 8 % max(ema.label_dim, 1)
    labels = F.one_hot(classes, ema.label_dim).to(torch.float32) if ema.label_dim else None
    images = sample(ema, latents, {"class_labels": labels}, rnd.randn_like)   # training RNGs untouched
    save_grid(images.to(torch.float32).cpu(), path, f"EMA samples after {cur_nimg / 1e3:g} kimg (seeds 0-63)",
              [class_names[c] for c in classes[::8].tolist()] if ema.label_dim else None)


# ----------------------------------------------------------------------------
# Command line.

# The run's own options (no setup changes them); the options a resumed run may change (not the maths).
RUN_DEFAULTS = dict(tf32=False, compile=False, channels_last=False, resume=None, stop_kimg=None,
                    outdir=os.path.join("out", "07_train_cifar10"), device="auto", seed=0)
RESUMABLE = set(RUN_DEFAULTS) - {"tf32", "seed"} | {"duration", "tick", "snap", "batch_gpu", "data_dir", "preset"}

# One rule for the units of training length, so that no option has to be looked up.
UNITS = ("Units: Table 7's schedule (--duration, --lr-rampup, --ema) in Mimg, as the paper gives it;\n"
         "bookkeeping intervals (--tick, --snap, --stop-kimg) in kimg. Each option's help names its unit.")


def build_parser(preset):
    """The parser, with `preset`'s values as defaults so that --help shows what would run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, epilog=f"{UNITS}\nDefaults shown: " +
                                     (f"--preset {preset}." if preset else "no preset (Table 7's CIFAR-10 values)."))
    d = dict(DEFAULTS, **PRESETS.get(preset, {}), **RUN_DEFAULTS, data_dir=DATA_DIR, preset=preset)
    kimg, probability, positive = common.number(float, low=0.001), common.number(float, 0, 1), common.number(int, low=1)
    flag = dict(action=argparse.BooleanOptionalAction)   # --x / --no-x

    def add(option, help, shown=None, **kwargs):
        value = d[option[2:].replace("-", "_")]
        shown = shown if value is None else ",".join(map(str, value)) or "none" if isinstance(value, list) else value
        parser.add_argument(option, default=value, help=f"{help} (default: {shown})", **kwargs)

    add("--preset", "paper setup to start from; flags override its values", "tiny if neither --preset nor --data "
        "is given", choices=sorted(PRESETS))
    add("--data", "cifar10 | shapes | a folder or .zip of images", "required")
    add("--data-dir", "where CIFAR-10 is found or downloaded to")
    add("--resolution", "size of the shapes; image data is center-cropped and resized to it (LANCZOS, as the "
        "official dataset_tool.py)", "16 for shapes; the images' own size", type=common.number(int, low=4))
    add("--resize", "with --resolution, crop and resize image data (--no-resize: require every image to be "
        "RxR already)", **flag)
    add("--cond", "class-conditional (labels from dataset.json or class sub-folders)", **flag)
    add("--xflip", "add an x-flipped copy of every image", **flag)
    add("--arch", "network of chapter 06", choices=["ddpmpp", "ncsnpp", "adm"])
    add("--precond", "preconditioning and loss of chapter 05 (Table 1; fm: flow matching)", choices=sorted(PRECONDS))
    add("--loss-weighting", "lambda(sigma) of Table 1, or EDM2's learned uncertainty weighting on top of it (edm, fm)",
        choices=["fixed", "learned"])
    add("--cbase", "channel multiplier", "128; adm 192", type=positive)
    add("--cres", "channels per resolution, e.g. 2,2,2", "2,2,2; adm 1,2,3,4", type=common.number_list(int, low=1))
    add("--blocks", "residual blocks per resolution", "4; adm 3", type=positive)
    add("--attn", "resolutions with self-attention ('' = none)", "16; adm 32,16,8",
        type=common.number_list(int, low=1, empty=True))
    add("--dropout", "dropout probability", type=probability)
    add("--augment", "augmentation probability p (App. F.2; 0 = off)", type=probability)
    add("--label-dropout", "probability of dropping a training image's class (for classifier-free guidance; "
        "needs --cond)", type=probability)
    add("--duration", "training length, Mimg", type=common.number(float, low=1e-6))
    add("--batch", "total batch size over all processes", type=positive)
    add("--batch-gpu", "images per process and round; more rounds: gradient accumulation", "all", type=positive)
    add("--lr", "Adam learning rate", type=common.number(float, low=0))
    add("--lr-rampup", "learning-rate ramp-up, Mimg", type=common.number(float, low=0))
    add("--ema", "EMA half-life, Mimg", type=common.number(float, low=0))
    add("--sigma-data", "EDM's data standard deviation (Table 1; 07 prints the measured one)",
        type=common.number(float, low=1e-6))
    add("--P-mean", "training noise levels of edm and fm: ln sigma ~ N(P_mean, P_std^2)", "-1.2; fm 0 (SD3)",
        type=common.number(float))
    add("--P-std", "(see --P-mean)", "1.2; fm 1", type=common.number(float, low=1e-6))
    add("--phema", "also keep EDM2's power-function EMAs of these relative widths sigma_rel, e.g. 0.05,0.10, "
        "snapshotted as phema-<sigma_rel>-<kimg>.pt every --snap; 11_post_hoc_ema.py turns them into any EMA length",
        type=common.number_list(float, low=1e-6, high=1 / math.sqrt(12), empty=True))   # 11's PHEMA_SIGMA_REL_MAX
    add("--precision", "autocast dtype", choices=["fp32", "bf16", "fp16"])
    add("--tf32", "allow TF32 matmuls (the paper: off)", **flag)
    add("--compile", "torch.compile the network for training (not the paper's; sampling stays eager)", **flag)
    add("--channels-last", "NHWC memory format for the network and its inputs (not the paper's; off: GroupNorm "
        "may transpose NHWC on CUDA -- measure with tools/gpu_check.sh)", **flag)
    add("--tick", "interval of progress lines and stats.jsonl, kimg", type=kimg)
    add("--snap", "interval of snapshots, previews and training states, kimg", type=kimg)
    add("--resume", "auto (continue the run in --outdir if there is one) or a training-state .pt", "a new run")
    add("--stop-kimg", "save and stop after this many images, kimg; the schedules still follow --duration (for job "
        "time limits)", "run to --duration", type=kimg)
    add("--outdir", "the run folder: snapshots, previews, training states, stats")
    add("--device", "cpu, cuda, ...; under torchrun each process takes the GPU of its LOCAL_RANK")
    add("--seed", "seed of the initial weights, the data order and every random stream", type=common.number(int, low=0))
    return parser


def parse_args(argv=None):
    """Find --preset (and --data) first, then parse everything with that preset's defaults."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--preset", choices=sorted(PRESETS))
    first.add_argument("--data")
    first.error = usage_error = lambda message: sys.exit(f"error: {message}")   # one line, not a usage dump
    known, _ = first.parse_known_args(argv)
    parser = build_parser(known.preset or ("tiny" if known.data is None else None))   # plain command: the demo
    parser.error = usage_error
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error(f"--preset {args.preset} needs --data (cifar10, shapes, or a folder/zip of images)")
    if len(set(args.phema)) != len(args.phema):
        parser.error(f"--phema: each sigma_rel once, got {','.join(map(str, args.phema))}")
    if args.label_dropout > 0 and not args.cond:
        parser.error("--label-dropout needs --cond: only class labels can be dropped")
    edm_constants = ("sigma_data", "P_mean", "P_std")
    if args.precond not in P_TRAIN and any(getattr(args, k) != DEFAULTS[k] for k in edm_constants):
        parser.error(f"--sigma-data, --P-mean and --P-std are EDM's constants; --precond {args.precond} has its own")
    if args.precond == "fm" and args.sigma_data != DEFAULTS["sigma_data"]:
        parser.error("--sigma-data is EDM's constant; --precond fm's scalings have none (c_in = 1 / (1 + sigma))")
    if args.loss_weighting == "learned" and args.precond not in P_TRAIN:
        parser.error(f"--loss-weighting learned is EDM2's weighting of the EDM loss: --precond edm or fm, "
                     f"not {args.precond}")
    P_mean, P_std = P_TRAIN.get(args.precond, P_TRAIN["edm"])   # (VP, VE: recorded as before, unused)
    args.P_mean, args.P_std = P_mean if args.P_mean is None else args.P_mean, P_std if args.P_std is None else args.P_std
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        rank, _, device = common.init_distributed(args.device)
        kimg = train(args, device)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()   # every rank is done with the group before any rank closes its connections
    except KeyboardInterrupt:
        if common.get_rank() == 0:
            print(interrupted(args, argv), file=sys.stderr)
        sys.exit(130)                     # the shell's code for "ended by Ctrl-C"
    except (ValueError, OSError, ImportError) as error:   # ImportError: --phema without 11_post_hoc_ema.py
        sys.exit(f"error: {error}")
    except (torch.cuda.OutOfMemoryError, MemoryError):
        sys.exit(f"error: out of memory; lower --batch-gpu (gradient accumulation keeps --batch {args.batch})")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        conclude(args, kimg)


def interrupted(args, argv):
    """Ctrl-C: one line naming what is saved and the command that continues from it. (Nothing is lost: the
    training state is replaced only once its successor is complete on disk.)"""
    state = os.path.join(args.outdir, STATE)
    if not os.path.exists(state):
        return f"interrupted before the first training state was saved in {args.outdir}; nothing to resume"
    snapshots = sorted(glob.glob(os.path.join(args.outdir, "network-snapshot-*.pt")))
    at = f" (with {os.path.basename(snapshots[-1])})" if snapshots else ""
    command = list(argv) + ([] if args.resume else ["--resume", "auto"])
    return f"interrupted: the last saved state is {state}{at}; continue with: python {os.path.basename(__file__)} " \
           + shlex.join(command)


def conclude(args, kimg):
    """Which files to open, what they show, and the next command."""
    run_dir = args.outdir
    last = lambda pattern: (sorted(glob.glob(os.path.join(run_dir, pattern))) or ["(none)"])[-1]
    print(f"\n{'finished' if kimg >= args.duration * 1e3 else 'stopped (continue: --resume auto)'} at {kimg:g} kimg. "
          f"Open {last('preview-*.png')} and compare it with {os.path.join(run_dir, 'reals.png')}.\n"
          f"Next, images from the last snapshot (chapter 08):\n"
          f"  python 08_evaluate_fid.py generate --network {last('network-snapshot-*.pt')}\n\n"
          f"What this shows (files in {run_dir}):\n"
          f"  reals.png              64 training images: what the samples should come to look like\n"
          f"  preview-*.png          EMA samples of seeds 0-63{' (a class per row)' * args.cond} at each snapshot: "
          f"noise,\n{'':25}then blobs, then the data's shapes -- Eq. 2's loss and Table 7's schedule at work\n"
          f"  network-snapshot-*.pt  EMA weights + network configuration; 06's load_network and 08 read them\n"
          + f"  phema-*.pt             --phema's power-function EMAs; python 11_post_hoc_ema.py --run {run_dir} "
          f"--sigma-rel S --out FILE\n{'':25}gives the EMA of any width S\n" * bool(args.phema) +
          "  training-state.pt      what --resume auto continues from (bit for bit on a CPU); -prev: the one before\n"
          "  training_options.json  this run's options, dataset and network configuration\n"
          "  stats.jsonl            one line per tick: loss mean and std, learning rate, images/s, TFLOP/s, memory")


if __name__ == "__main__":
    main()
