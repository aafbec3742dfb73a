"""07 -- Training: the paper's recipe for CIFAR-10 (and ImageNet-64, and your own images).

Chapter 05 gave the loss (Eq. 2 with the preconditioning of Eq. 7 and the noise
distribution ln(sigma) ~ N(P_mean, P_std^2) of Table 1); chapter 06 gave the networks.
This file is the rest of Sec. 5 and Appendix F: how the paper actually trains them.

  * Data. CIFAR-10 through torchvision, any folder or zip of PNG/JPEG images (the
    official dataset-tool layout with an optional dataset.json of labels, or one
    sub-folder per class), or a built-in procedural dataset of coloured shapes that
    needs no download. Images are decoded once into a uint8 cache in memory;
    `--xflip` doubles the dataset with mirrored copies.
  * Non-leaking augmentation (Sec. 5, App. F.2). With probability p each image is
    flipped, scaled, rotated, stretched and shifted *before* noise is added, and the
    9 numbers describing what was done are given to the network as extra
    conditioning ("augment labels"). The network learns to denoise augmented images
    as augmented images, so at sampling time (labels = 0) it produces un-augmented
    ones: the augmentations do not leak into the generated distribution.
  * The loop (Table 7): Adam (beta 0.9/0.999, eps 1e-8); the learning rate ramps up
    linearly over the first 10 Mimg; the weights are averaged with an exponential
    moving average whose half-life is given in images (0.5 Mimg for CIFAR-10) and
    shortened to 5% of the images seen early in training; gradients with NaN/Inf
    entries are sanitised rather than skipped; the loss is summed per image and
    averaged over the batch.
  * Scale. The same file runs alone (`python 07_train_cifar10.py`) or as one process
    per GPU under `torchrun` (DistributedDataParallel, NCCL on GPUs, gloo on CPU).
    Each rank reads its own shard of one shuffled stream of images; `--batch-gpu`
    splits a rank's share into gradient-accumulation rounds, and gradients are
    averaged across ranks only after the last round. Mixed precision via autocast.
  * Checkpoints you cannot lose. Every `--snap` kimg: a network snapshot (EMA
    weights + config, read by 06's `load_network` and by 08), a preview grid drawn
    with 04's sampler from fixed seeds, and the full training state (weights, EMA,
    optimizer, images seen, data-stream position, every RNG), each written to a
    temporary file and renamed into place, keeping the previous good state. A run
    resumed with `--resume auto` continues bit for bit as if never stopped.

Paper setups (`--preset`; explicit flags override preset values):
  cifar10     DDPM++ (or --arch ncsnpp), EDM preconditioning, 200 Mimg, batch 512,
              lr 1e-3, EMA 0.5 Mimg, dropout 0.13, augment p = 0.12   [FID 1.79 / 1.97]
  imagenet64  ADM, class-conditional, 2500 Mimg, batch 4096, lr 1e-4, EMA 50 Mimg,
              dropout 0.10, no augmentation, fp16 mixed precision
  tiny        a small DDPM++ on 16x16 coloured shapes: a few minutes on a laptop CPU,
              and the preview grids show the shapes forming

Examples:
  python 07_train_cifar10.py                     # = --preset tiny; watch out/07_train_cifar10/preview-*.png
  torchrun --standalone --nproc_per_node=8 07_train_cifar10.py --preset cifar10 --cond --outdir runs/cifar10-cond
  python 07_train_cifar10.py --preset cifar10 --resume auto --outdir runs/cifar10-cond   # continue a run
"""

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import resource
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

import common

precond = common.load("05_preconditioning")
unet = common.load("06_unet")
sampler = common.load("04_stochastic_sampler")


# ----------------------------------------------------------------------------
# Configuration: presets reproduce the paper's setups; explicit flags win.

PRESETS = {
    # Table 7, CIFAR-10 column (train.py defaults of the official code).
    "cifar10": dict(data="cifar10", arch="ddpmpp", precond="edm", duration=200, batch=512, lr=1e-3,
                    ema=0.5, dropout=0.13, augment=0.12, lr_rampup=10, precision="fp32", tick=50, snap=2500),
    # Table 7, ImageNet-64 column: class-conditional ADM, fp16 mixed precision, no augmentation.
    "imagenet64": dict(data=None, cond=True, arch="adm", precond="edm", duration=2500, batch=4096, lr=1e-4,
                       ema=50, dropout=0.10, augment=0, lr_rampup=10, precision="fp16", tick=200, snap=10000),
    # A few CPU-minutes: 16x16 shapes, a 0.3M-parameter DDPM++ (2000 steps of 32); short ramp-ups to match.
    "tiny": dict(data="shapes", resolution=16, cond=True, arch="ddpmpp", precond="edm", cbase=16, cres=[1, 2, 2],
                 blocks=1, attn=[], duration=0.064, batch=32, lr=2e-3, ema=0.005, dropout=0, augment=0,
                 lr_rampup=0.01, precision="fp32", tick=4, snap=16),
}

# Options that may differ between a run and its resumption (they do not change the maths).
RESUMABLE = {"duration", "stop_kimg", "tick", "snap", "outdir", "resume", "device", "compile", "batch_gpu",
             "data_dir", "preset"}


def int_list(text):
    return [int(v) for v in text.split(",") if v != ""]


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    parser.error = usage_error   # one line instead of argparse's usage dump
    parser.add_argument("--preset", choices=sorted(PRESETS), help="paper setup to start from (flags override)")
    parser.add_argument("--data", help="cifar10 | shapes | path to a folder or .zip of PNG/JPEG images")
    parser.add_argument("--data-dir", default=DATA_DIR, help="where CIFAR-10 is (downloaded to)")
    parser.add_argument("--resolution", type=common.number(int, low=4), help="size of the shapes dataset; for image data, a check")
    flag = dict(action=argparse.BooleanOptionalAction, default=False)   # --x / --no-x
    parser.add_argument("--cond", **flag, help="class-conditional (needs labels)")
    parser.add_argument("--xflip", **flag, help="double the dataset with x-flips")
    parser.add_argument("--arch", choices=["ddpmpp", "ncsnpp", "adm"], default="ddpmpp")
    parser.add_argument("--precond", choices=["vp", "ve", "edm"], default="edm")
    parser.add_argument("--cbase", type=int, help="channel multiplier (default: 128 ddpmpp/ncsnpp, 192 adm)")
    parser.add_argument("--cres", type=int_list, help="channels per resolution, e.g. 2,2,2")
    parser.add_argument("--blocks", type=int, help="residual blocks per resolution (default: 4 SongUNet, 3 ADM)")
    parser.add_argument("--attn", type=int_list, help="resolutions with attention (default: 16 SongUNet, 32,16,8 ADM)")
    parser.add_argument("--dropout", type=float, default=0.13)
    parser.add_argument("--augment", type=float, default=0.12, help="augmentation probability p (0 = off)")
    parser.add_argument("--duration", type=float, default=200, help="training length in Mimg")
    parser.add_argument("--batch", type=int, default=512, help="total batch size (all ranks)")
    parser.add_argument("--batch-gpu", type=int, help="per-rank micro-batch; the rest is gradient accumulation")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-rampup", type=float, default=10, help="learning-rate ramp-up, Mimg")
    parser.add_argument("--ema", type=float, default=0.5, help="EMA half-life, Mimg")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    parser.add_argument("--tf32", **flag, help="allow TF32 matmuls (off: as the paper)")
    parser.add_argument("--compile", **flag, help="torch.compile the network")
    parser.add_argument("--tick", type=float, default=50, help="log interval, kimg")
    parser.add_argument("--snap", type=float, default=2500, help="snapshot/preview/checkpoint interval, kimg")
    parser.add_argument("--resume", help="auto (continue the run in --outdir, if any) or a training-state .pt")
    parser.add_argument("--stop-kimg", type=float, help="save and stop once this many kimg are done "
                        "(the schedule still follows --duration; for job time limits)")
    args, _ = parser.parse_known_args(argv)
    if args.preset is None and args.data is None:   # plain `python 07_train_cifar10.py`: the CPU demo
        parser.set_defaults(preset="tiny")
        args.preset = "tiny"
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
    args = parser.parse_args(argv)
    if args.data is None:
        sys.exit(f"error: --preset {args.preset} needs --data (cifar10, shapes, or a folder/zip of images)")
    return args


def usage_error(message):
    sys.exit(f"error: {message}")


def check_args(args, world_size):
    """Errors that need no data: one line each, before anything is written."""
    if args.batch % world_size:
        sys.exit(f"error: --batch {args.batch} is not divisible by the {world_size} processes")
    batch_rank = args.batch // world_size
    batch_gpu = args.batch_gpu or batch_rank
    if batch_gpu > batch_rank or batch_rank % batch_gpu:
        sys.exit(f"error: --batch {args.batch} must be divisible by processes x --batch-gpu "
                 f"({world_size} x {batch_gpu})")
    for name in ("duration", "lr", "tick", "snap"):
        if getattr(args, name) <= 0:
            sys.exit(f"error: --{name} must be positive")
    if not 0 <= args.augment <= 1 or not 0 <= args.dropout <= 1:
        sys.exit("error: --augment and --dropout are probabilities in [0, 1]")
    return batch_gpu, batch_rank // batch_gpu


# ----------------------------------------------------------------------------
# Data: images become a uint8 tensor [N, C, H, W] plus integer class labels (or none).
# This section is also 08's image reader (08 loads this file for it): one --data-dir
# default, one list of extensions, one CIFAR-10 loader.

DATA_DIR = os.path.join("out", "data")       # where CIFAR-10's tarball is looked for (07 and 08)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolder:
    """The images of a folder or .zip (searched recursively, sorted by relative name), decoded on demand.

    `read(i)` gives image i as uint8 [C, H, W] (C = 1 greyscale or 3 RGB); every image must
    have the first one's shape. `labels` reads the official dataset-tool layout's
    dataset.json ({"labels": [["00000/img00000000.png", 6], ...]}); without one, images in one
    sub-folder per class get the index of their (sorted) folder name; otherwise None.
    """

    def __init__(self, path):
        self.path = path
        self._zip = None
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r}: no such folder or .zip of images")
        if os.path.isdir(path):
            files = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                           for root, _, names in os.walk(path) for f in names)
        elif zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            files = sorted(n for n in self._zip.namelist() if not n.endswith("/"))
        else:
            raise ValueError(f"{path!r} is neither a folder nor a .zip file of images")
        self._files = files
        self.names = [n for n in files if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.names:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path!r}")
        self.shape = None
        self.shape = self.read(0).shape              # every later image must match the first

    def __len__(self):
        return len(self.names)

    def _bytes(self, name):
        if self._zip is not None:
            return self._zip.read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def read(self, i):
        """Image i as a uint8 numpy array [C, H, W]."""
        import PIL.Image
        name = self.names[i]
        try:
            with PIL.Image.open(io.BytesIO(self._bytes(name))) as image:
                array = np.array(image.convert("L" if image.mode in ("L", "I;16", "I", "1") else "RGB"))
        except Exception as error:   # PIL raises many kinds for a damaged file
            raise ValueError(f"cannot read image {name!r} in {self.path!r} ({type(error).__name__}: {error})")
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if self.shape is not None and array.shape != self.shape:
            shape = lambda s: f"{s[2]}x{s[1]} with {s[0]} channel(s)"
            raise ValueError(f"{name!r} is {shape(array.shape)} but {self.names[0]!r} is {shape(self.shape)}; "
                             f"all images in {self.path!r} must have one size and channel count")
        return array

    def batch(self, indices):
        """Images `indices` as a uint8 tensor [N, C, H, W]."""
        return torch.from_numpy(np.stack([self.read(int(i)) for i in indices]))

    @property
    def labels(self):
        """Class labels (int64 [N]; float32 [N, D] if dataset.json holds vectors), or None."""
        if "dataset.json" in self._files:
            labels = json.loads(self._bytes("dataset.json")).get("labels")
            if labels is None:
                return None
            labels = dict(labels)
            missing = [n for n in self.names if n not in labels]
            if missing:
                raise ValueError(f"dataset.json in {self.path!r} has no label for {missing[0]!r}")
            labels = np.asarray([labels[n] for n in self.names])
            return labels.astype(np.int64 if labels.ndim == 1 else np.float32)
        folders = [n.split("/")[0] if "/" in n else None for n in self.names]
        if None in folders or len(set(folders)) < 2:
            return None
        classes = sorted(set(folders))
        return np.asarray([classes.index(d) for d in folders], dtype=np.int64)


def load_cifar10(data_dir=DATA_DIR):
    """The 50,000 CIFAR-10 training images (uint8 [50000, 3, 32, 32]) and their classes (int64 [50000])."""
    import torchvision
    try:
        dataset = torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True)
    except Exception as error:   # offline: urllib/socket/integrity errors all end here
        raise OSError(f"CIFAR-10 is not in {data_dir!r} and could not be downloaded ({type(error).__name__}); "
                      f"put cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
                      f"into {data_dir!r}") from None
    images = torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, np.asarray(dataset.targets, dtype=np.int64)


# The built-in dataset: coloured shapes on dark backgrounds, one class per shape.
SHAPES = ["disc", "square", "triangle", "cross"]


def make_shapes_dataset(n, resolution, seed=0, supersample=4):
    """n procedurally drawn RGB images (uint8 [n, 3, R, R]) and their class (index into SHAPES).

    Each shape has a random saturated colour, size and position; edges are anti-aliased
    by drawing at `supersample` times the size and averaging down.
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)
    classes = torch.randint(len(SHAPES), [n], generator=g)
    size = resolution * (0.22 + 0.12 * u(n, 1, 1))                        # half-width in pixels
    cx = resolution / 2 + (u(n, 1, 1) - 0.5) * (resolution - 2.6 * size)   # keep the shape inside
    cy = resolution / 2 + (u(n, 1, 1) - 0.5) * (resolution - 2.6 * size)
    s = resolution * supersample
    coords = (torch.arange(s) + 0.5) / supersample
    dx = coords.view(1, 1, s) - cx
    dy = coords.view(1, s, 1) - cy
    masks = torch.stack([
        dx ** 2 + dy ** 2 <= size ** 2,                                                        # disc
        torch.maximum(dx.abs(), dy.abs()) <= 0.8 * size,                                       # square
        (dy <= 0.8 * size) & (dx.abs() * 1.8 <= (dy + size)),                                 # triangle, apex up
        ((dx.abs() <= 0.3 * size) & (dy.abs() <= size)) | ((dy.abs() <= 0.3 * size) & (dx.abs() <= size)),  # cross
    ])[classes, torch.arange(n)].to(torch.float32)
    masks = F.avg_pool2d(masks[:, None], supersample)                      # [n, 1, R, R] coverage
    hue = u(n) * 6                                                          # saturated colour from a hue
    colour = torch.stack([(hue - k).remainder(6).sub(3).abs().sub(1).clamp(0, 1) for k in (0, 4, 2)], 1)
    colour = 0.35 + 0.65 * colour
    background = 0.05 + 0.15 * u(n, 1)                                      # dark grey
    images = masks * colour.view(n, 3, 1, 1) + (1 - masks) * background.view(n, 1, 1, 1)
    return (images * 255).round().to(torch.uint8), classes.numpy()


class TrainingSet:
    """The training images in memory (decoded once) with one-hot labels; with xflip, index N + i is image i mirrored."""

    def __init__(self, name, images, labels, xflip):
        self.name = name
        self.images = images                          # uint8 [N, C, H, W]
        self.labels = labels                          # float32 [N, label_dim]; label_dim 0 = unconditional
        self.xflip = xflip
        self.resolution, self.channels, self.label_dim = images.shape[2], images.shape[1], labels.shape[1]

    def __len__(self):
        return len(self.images) * (2 if self.xflip else 1)

    def batch(self, indices):
        n = len(self.images)
        raw = indices % n
        flip = (indices >= n).view(-1, 1, 1, 1)
        return torch.where(flip, self.images[raw].flip(3), self.images[raw]), self.labels[raw]


def one_hot(labels):
    """Integer class labels -> one-hot float rows; label vectors pass through."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return torch.as_tensor(labels, dtype=torch.float32)
    if labels.min() < 0:
        raise ValueError("class labels must be non-negative integers")
    return F.one_hot(torch.as_tensor(labels, dtype=torch.int64), int(labels.max()) + 1).to(torch.float32)


def load_dataset(args):
    """--data (cifar10 | shapes | folder/zip) -> TrainingSet, checked against the network it will feed."""
    if args.data == "cifar10":
        images, labels = load_cifar10(args.data_dir)
        name = "cifar10"
    elif args.data == "shapes":
        images, labels = make_shapes_dataset(4096, args.resolution or 16)
        name = f"shapes{images.shape[2]}"
    else:
        if not os.path.exists(args.data):
            raise FileNotFoundError(f"--data {args.data!r}: unknown dataset (not cifar10, shapes, "
                                    f"or an existing folder/zip of images)")
        folder = ImageFolder(args.data)
        images, labels = folder.batch(range(len(folder))), folder.labels
        name = os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]
    n, c, h, w = images.shape
    if h != w:
        raise ValueError(f"images must be square, got {w}x{h}")
    if args.resolution is not None and h != args.resolution:
        raise ValueError(f"--resolution {args.resolution} but the images are {h}x{w}")
    levels = len(args.cres or ([1, 2, 3, 4] if args.arch == "adm" else [2, 2, 2]))
    if h % 2 ** (levels - 1):
        raise ValueError(f"resolution {h} is not divisible by 2^{levels - 1} as the {levels}-level U-Net needs")
    if args.cond and labels is None:
        raise ValueError(f"--cond needs labels, and {args.data!r} has none (dataset.json or class sub-folders)")
    return TrainingSet(name, images, one_hot(labels) if args.cond else torch.zeros([n, 0]), args.xflip)


# ----------------------------------------------------------------------------
# The data stream: one endless shuffled sequence of dataset indices, shared by all ranks.

class InfiniteSampler:
    """Epoch e of the stream is a permutation drawn from (seed, e); rank r of R reads entries r, r+R, r+2R, ...

    The whole state is `position` (entries consumed by all ranks together), so a
    resumed run -- even one with a different number of ranks -- reads exactly the
    images the uninterrupted run would have read.
    """

    def __init__(self, size, seed, rank=0, num_ranks=1, position=0):
        self.size, self.seed, self.rank, self.num_ranks = size, seed, rank, num_ranks
        self.position = position
        self._perms = {}

    def permutation(self, epoch):
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}   # keep one epoch back
            self._perms[epoch] = torch.randperm(self.size, generator=generator)
        return self._perms[epoch]

    def next(self, batch):
        """This rank's next `batch` indices; all ranks advance together by batch * num_ranks."""
        stream = self.position + self.rank + self.num_ranks * torch.arange(batch)
        self.position += batch * self.num_ranks
        epochs, offsets = stream // self.size, stream % self.size
        indices = torch.empty(batch, dtype=torch.int64)
        for epoch in epochs.unique().tolist():
            here = epochs == epoch
            indices[here] = self.permutation(epoch)[offsets[here]]
        return indices


def derive_seed(*parts):
    """An independent 63-bit seed for each (run seed, purpose, ...) tuple."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------
# Non-leaking augmentation (Sec. 5, App. F.2), the transforms of the paper's CIFAR-10 runs.
# Geometric maths (the padding, the 2x up/down-sampling with a symlet-6 low-pass, the
# coordinate conventions) follow StyleGAN2-ADA's pipeline, which the official EDM code reuses.

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
    images = F.conv2d(images, kernel.transpose(2, 3), stride=(2, 1), padding=(5, 0), groups=C)[:, :, extra:-extra, :]
    return images


# ----------------------------------------------------------------------------
# Networks and losses in the official configuration vocabulary (train.py of NVlabs/edm).

ARCHS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                   model_channels=128, channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                   model_channels=128, channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECONDS = {"vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss"), "edm": ("EDMPrecond", "EDMLoss")}


def network_config(args, data):
    """(class_name, kwargs) exactly as the official constructors take them."""
    kwargs = dict(img_resolution=data.resolution, img_channels=data.channels, label_dim=data.label_dim,
                  use_fp16=False, **ARCHS[args.arch])   # mixed precision comes from autocast instead
    if args.cbase is not None:
        kwargs["model_channels"] = args.cbase
    if args.cres is not None:
        kwargs["channel_mult"] = args.cres
    if args.blocks is not None:
        kwargs["num_blocks"] = args.blocks
    if args.attn is not None:
        kwargs["attn_resolutions"] = args.attn
    if args.augment > 0:
        kwargs["augment_dim"] = len(AUGMENT_LABELS)
    kwargs["dropout"] = args.dropout
    return PRECONDS[args.precond][0], kwargs


# ----------------------------------------------------------------------------
# The two schedules of the loop.

def learning_rate(cur_nimg, lr, rampup_mimg):
    """Linear warm-up from 0 to lr over the first rampup_mimg million images, then constant."""
    return lr * min(cur_nimg / max(rampup_mimg * 1e6, 1e-8), 1)


def ema_beta(cur_nimg, batch_size, halflife_mimg, rampup_ratio=0.05):
    """Per-step EMA decay: the average forgets half its weight every `halflife` images.

    Early on the half-life is capped at rampup_ratio x images seen, so the average is
    not dominated by the random initial weights.
    """
    halflife_nimg = halflife_mimg * 1e6
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema, net, beta):
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))     # beta * ema + (1 - beta) * net


# ----------------------------------------------------------------------------
# Distributed helpers: with one process these are no-ops.

def init_distributed(device_name):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs alone."""
    if "RANK" not in os.environ:
        return 0, 1, common.get_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def all_mean(sums):
    """[sum, sum of squares, count] summed over ranks -> global mean and std."""
    sums = sums.clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    total, squares, count = sums.tolist()
    mean = total / max(count, 1)
    return mean, math.sqrt(max(squares / max(count, 1) - mean ** 2, 0))


def gather(obj):
    """Every rank's obj, in rank order (just [obj] without torchrun)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def weights_digest(module):
    """A hash of every parameter's bytes: ranks in sync have equal digests."""
    h = hashlib.sha1()
    for p in module.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Checkpoints: written to a temp file and renamed into place; the previous good one is kept.

STATE, PREVIOUS = "training-state.pt", "training-state-prev.pt"


def atomic_save(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_state(state, run_dir):
    """training-state.pt <- state; the old one becomes training-state-prev.pt only once the new one is complete."""
    tmp = os.path.join(run_dir, STATE + ".tmp")
    atomic_save(state, tmp)                       # a crash here leaves both old files intact
    if os.path.exists(os.path.join(run_dir, STATE)):
        os.replace(os.path.join(run_dir, STATE), os.path.join(run_dir, PREVIOUS))
    os.replace(tmp, os.path.join(run_dir, STATE))


def read_state(path, fallback=None):
    """torch.load a training state (weights-only safe); if it is unreadable, warn and try `fallback`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as error:
        if fallback is None or not os.path.exists(fallback):
            sys.exit(f"error: cannot read training state {path!r} ({type(error).__name__})")
        print(f"warning: {path} is unreadable ({type(error).__name__}); resuming from the previous "
              f"good state {fallback}", file=sys.stderr)
        return read_state(fallback)


def find_resume(args, run_dir):
    """The training state to continue from, or None to start fresh."""
    latest, previous = os.path.join(run_dir, STATE), os.path.join(run_dir, PREVIOUS)
    if args.resume is None:
        if os.path.exists(latest) or os.path.exists(previous):
            sys.exit(f"error: {run_dir!r} already holds a training run; pass --resume auto to continue it "
                     f"or choose another --outdir")
        return None
    if args.resume == "auto":
        if os.path.exists(latest):
            return read_state(latest, fallback=previous)
        return read_state(previous) if os.path.exists(previous) else None
    if not os.path.isfile(args.resume):
        sys.exit(f"error: --resume {args.resume!r}: no such file")
    return read_state(args.resume)


def rng_state(device, augment_generator):
    """Every random stream this rank uses, as tensors and plain numbers (torch.load weights_only-safe)."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=dict(key=torch.as_tensor(np_state[1].astype(np.int64)), pos=np_state[2],
                            has_gauss=np_state[3], cached_gaussian=np_state[4]),
                 augment=augment_generator.get_state() if augment_generator is not None else None)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device, augment_generator):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if augment_generator is not None:
        augment_generator.set_state(state["augment"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resumable(saved, args):
    changed = sorted(k for k, v in vars(args).items() if k not in RESUMABLE and saved.get(k, v) != v)
    if changed:
        sys.exit("error: cannot resume with different " + ", ".join(
            f"--{k.replace('_', '-')} ({saved[k]} -> {getattr(args, k)})" for k in changed))


# ----------------------------------------------------------------------------
# Seeing progress: preview grids from fixed seeds, and stats.jsonl.

PREVIEW_SEEDS = range(64)


@torch.no_grad()
def save_preview(ema, path, device):
    """8x8 samples from seeds 0..63 (row r: class r mod label_dim) with the deterministic EDM sampler."""
    rnd = common.StackedRandomGenerator(device, PREVIEW_SEEDS)
    latents = rnd.randn([len(PREVIEW_SEEDS), ema.img_channels, ema.img_resolution, ema.img_resolution], device=device)
    labels = None
    if ema.label_dim:
        rows = torch.arange(len(PREVIEW_SEEDS), device=device) // 8
        labels = F.one_hot(rows % ema.label_dim, ema.label_dim).to(torch.float32)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images = sampler.edm_sampler(ema, latents, labels, randn_like=rnd.randn_like)   # the global RNG is untouched
    common.save_grid(images.to(torch.float32).cpu(), path, nrow=8)


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux reports KiB


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# The training run.

def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(args.device)
    try:
        train(args, rank, world_size, device)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: out of GPU memory; lower --batch-gpu (gradient accumulation keeps --batch {args.batch})")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(args, rank, world_size, device):
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    batch_gpu, num_rounds = check_args(args, world_size)
    batch_rank = batch_gpu * num_rounds                     # images per rank per step

    # Everything that can fail on bad input happens before the first file is written.
    data = load_dataset(args)
    run_dir = args.outdir or os.path.join("out", "07_train_cifar10")
    resume = find_resume(args, run_dir)
    if resume is not None:
        state, resume_path = resume
        check_resumable(state["args"], args)
    class_name, net_kwargs = network_config(args, data)

    # Precision policy: TF32 off unless asked (the paper trained in true fp32); autocast for bf16/fp16.
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True   # fastest kernels; bit-exact GPU resumes would need deterministic ones
    amp_dtype = common.get_dtype(args.precision)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=args.precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    # Same initial weights on every rank (seed), then per-rank streams for noise, dropout and augmentation.
    torch.manual_seed(args.seed)
    net = unet.from_official_config(class_name, net_kwargs).train().requires_grad_(True).to(device)
    common.seed_all(derive_seed(args.seed, "rank", rank))
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    loss_fn = getattr(precond, PRECONDS[args.precond][1])()
    augment_generator = torch.Generator(device).manual_seed(derive_seed(args.seed, "augment", rank))
    augment_pipe = AugmentPipe(args.augment, augment_generator) if args.augment > 0 else None
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else net
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    stream = InfiniteSampler(len(data), args.seed, rank, world_size)
    cur_nimg = 0

    if resume is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        cur_nimg, stream.position = state["cur_nimg"], state["stream_position"]
        if len(state["rng"]) == world_size:
            set_rng_state(state["rng"][rank], device, augment_generator)
        else:   # a different number of ranks cannot replay the old streams; fresh ones, still deterministic
            print(f"warning: resuming {len(state['rng'])} ranks' run on {world_size}; random streams are re-seeded",
                  file=sys.stderr)
            common.seed_all(derive_seed(args.seed, "rank", rank, cur_nimg))
            augment_generator.manual_seed(derive_seed(args.seed, "augment", rank, cur_nimg))
        del state
    model = torch.compile(ddp) if args.compile else ddp

    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        write_json(dict(vars(args), world_size=world_size, dataset=data.name, dataset_size=len(data),
                        network=dict(class_name=class_name, kwargs=net_kwargs), batch_gpu=batch_gpu,
                        accumulation_rounds=num_rounds), os.path.join(run_dir, "training_options.json"))
        if resume is None:
            common.save_grid(data.batch(torch.arange(64) % len(data))[0].float() / 127.5 - 1,
                             os.path.join(run_dir, "reals.png"), nrow=8)
        start = f"resuming {resume_path} at {cur_nimg / 1e3:.1f} kimg" if resume else "new run"
        log(f"{start} -> {run_dir}\n{data.name}: {len(data)} images {data.resolution}x{data.resolution}x{data.channels}, "
            f"{data.label_dim} classes; {class_name}/{net_kwargs['model_type']} "
            f"{sum(p.numel() for p in net.parameters()):,} parameters; {world_size} process(es) on {device}, "
            f"batch {args.batch} = {world_size} x {num_rounds} x {batch_gpu}")

    total_nimg = int(args.duration * 1e6)
    stop_nimg = min(total_nimg, int(args.stop_kimg * 1e3)) if args.stop_kimg is not None else total_nimg
    next_tick = (cur_nimg // int(args.tick * 1e3) + 1) * int(args.tick * 1e3)
    next_snap = (cur_nimg // int(args.snap * 1e3) + 1) * int(args.snap * 1e3)
    bar = tqdm.tqdm(total=total_nimg / 1e3, initial=cur_nimg / 1e3, disable=not is_main, dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]")
    new_tick = lambda: (torch.zeros(3, dtype=torch.float64, device=device), torch.zeros([], device=device),
                        time.time(), cur_nimg)
    tick_losses, tick_nonfinite, tick_start, tick_nimg = new_tick()   # sums stay on the device: no syncs
    stats_path = os.path.join(run_dir, "stats.jsonl")

    while cur_nimg < stop_nimg:
        # One optimizer step: num_rounds micro-batches per rank, gradients averaged over ranks on the last.
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(num_rounds):
            last = round_idx == num_rounds - 1
            with (ddp.no_sync() if world_size > 1 and not last else contextlib.nullcontext()):
                images, labels = data.batch(stream.next(batch_gpu))
                images = images.to(device).to(torch.float32) / 127.5 - 1
                labels = labels.to(device)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast():
                    loss = loss_fn(net=model, images=images, labels=labels, augment_pipe=augment_pipe)
                per_image = loss.detach().double().mean(dim=(1, 2, 3))
                tick_losses += torch.stack([per_image.sum(), per_image.square().sum(),
                                            per_image.new_tensor(len(per_image))])
                scaler.scale(loss.sum() / batch_rank).backward()   # summed per image, averaged over the batch

        lr = learning_rate(cur_nimg, args.lr, args.lr_rampup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.unscale_(optimizer)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        tick_nonfinite += torch.stack([(~torch.isfinite(g)).any() for g in grads]).any()
        for g in grads:   # as the official loop: a rare NaN/Inf entry is neutralised, not allowed to poison Adam
            torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, net, ema_beta(cur_nimg, args.batch, args.ema))
        cur_nimg += args.batch
        bar.update(min(cur_nimg, total_nimg) / 1e3 - bar.n)

        done = cur_nimg >= stop_nimg
        snap_due = cur_nimg >= next_snap or done
        if cur_nimg >= next_tick or snap_due:
            next_tick = (cur_nimg // int(args.tick * 1e3) + 1) * int(args.tick * 1e3)
            loss_mean, loss_std = all_mean(tick_losses)
            seconds = time.time() - tick_start
            stats = dict(kimg=cur_nimg / 1e3, loss_mean=loss_mean, loss_std=loss_std, lr=lr,
                         images_per_sec=(cur_nimg - tick_nimg) / seconds,
                         sec_per_kimg=seconds / (cur_nimg - tick_nimg) * 1e3,
                         nonfinite_grad_steps=int(tick_nonfinite), memory_gb=memory_gb(device), timestamp=time.time())
            bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{stats['images_per_sec']:.0f}")
            if snap_due:
                next_snap = (cur_nimg // int(args.snap * 1e3) + 1) * int(args.snap * 1e3)
                stats["rank_digests"] = snapshot(args, run_dir, cur_nimg, net, ema, optimizer, scaler, stream,
                                                 device, augment_generator, is_main)
            if is_main:
                with open(stats_path, "a") as f:
                    f.write(json.dumps(stats) + "\n")
            tick_losses, tick_nonfinite, tick_start, tick_nimg = new_tick()
    bar.close()
    log(f"{'finished' if cur_nimg >= total_nimg else 'stopped'} at {cur_nimg / 1e3:.1f} kimg; outputs in {run_dir}")


def snapshot(args, run_dir, cur_nimg, net, ema, optimizer, scaler, stream, device, augment_generator, is_main):
    """Network snapshot + preview + training state. Returns every rank's weight digest (equal, or we stop)."""
    digests = gather(weights_digest(net) + "/" + weights_digest(ema))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the weights at {cur_nimg} images: {digests}")
    rngs = gather(rng_state(device, augment_generator))
    if is_main:
        kimg = f"{cur_nimg // 1000:06d}"
        unet.save_network(ema, os.path.join(run_dir, f"network-snapshot-{kimg}.pt"))
        save_preview(ema, os.path.join(run_dir, f"preview-{kimg}.png"), device)
        write_state(dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                         scaler=scaler.state_dict(), cur_nimg=cur_nimg, stream_position=stream.position,
                         rng=rngs, args=vars(args)), run_dir)
    return digests


if __name__ == "__main__":
    main()
