"""08_evaluate_fid.py -- how the paper's FID numbers are measured, and measuring ours the same way.

The headline results of EDM (FID 1.79 class-conditional and 1.97 unconditional on
CIFAR-10 at 35 network evaluations, Table 2) are Frechet Inception Distances:

    FID = |mu_g - mu_r|^2 + tr(Sigma_g + Sigma_r - 2 (Sigma_g Sigma_r)^(1/2))      (Heusel et al. 2017)

where (mu, Sigma) are the mean and covariance of 2048-d Inception-v3 pool features
of generated (g) and real (r) images. The number depends on every detail, so the
protocol of the paper and of the official generate.py/fid.py is followed exactly:

  1. 50,000 images, each a function of its seed only: latents, class label and the
     sampler's churn noise all come from one generator per seed (common.py), so the
     same seed gives the same image whatever the batch size or number of GPUs.
  2. Images quantized to uint8 exactly as they would be saved as PNG.
  3. Features from NVIDIA's TorchScript port of the TF Inception graph
     `inception-2015-12-05`, fed uint8 NCHW images (it resizes to 299 itself).
  4. mu and Sigma accumulated in float64 as sums over batches and GPUs; Sigma is the
     unbiased (n - 1) covariance.
  5. Three seed sets, 0-49999, 50000-99999, 100000-149999; the paper reports the minimum.

What it needs, loaded only where used: FID (`demo`, `ref`, `calc`) common.py alone (its image
reader too; `ref --data shapes` also 07, whose data set it is); generation (`generate`, `fid`) 04
(edm_sampler, Algorithm 2) and 06 (load_network: official pickles and 07's snapshots; +05). Flags
add one chapter each: --disc/--schedule/--scaling 03's ablation_sampler (+02), --solver/--nfe/
--sigma-steps 09's fast solvers, --guidance/--guide-network/--guidance-interval 10's guidance. A
missing file fails with one error line naming it.

Subcommands (each has --help; every option belongs to exactly one subcommand). Option names are dashed;
the paper's symbols keep their case (--sigma-min, --S-churn), and the underscore spellings (--sigma_min,
--S_churn) are accepted too:

  demo      (default) Frechet distance on Gaussians with known FID: how the estimate
            is biased by the number of images, and why the paper uses 50k and min-of-3.
            --seed --outdir --device
  generate  PNGs {seed:06d}.png with the EDM sampler (Algorithm 2), chapter 09's fast solvers or
            chapter 03's ablation sampler, guided or not (chapter 10), into a new or empty folder
            (default out/08_evaluate_fid/images/; --add: more seeds into one that has images), with
            grid.png (the folder's first 64 images) and generation.json (every setting); works under torchrun.
            --network --seeds --subdirs --outdir --add --class --batch --solver --steps/--nfe
            --sigma-steps --sigma-min ... --S-churn ... --guidance --guide-network --guidance-interval --device
  ref       reference statistics (mu, sigma) of a dataset -> .npz: cifar10, 07's shapes (07 loaded for them),
            or a folder/.zip of images
            --data --data-dir --resolution --dest --detector --batch --device
  calc      FID of a folder/zip of images against a reference .npz
            --images --ref -n/--num --seed --detector --batch --device
  fid       the whole protocol in one command: generate straight into statistics
            (the same images `generate` would write), three seed sets, JSON result
            (fid.json: FIDs, solver, sigma steps, measured NFE, guidance, ...)
            --network --ref -n/--num --repeats --outdir --detector --class --batch and
            generate's sampler and guidance options --device
  nearest   memorisation check: each generated image (--network and --seeds, or --images) beside its two
            nearest training images (--data), nearest.png and nearest.json; near-copy if d1 < d2 / 3
            (after Carlini et al. 2023)

Examples:

  python 08_evaluate_fid.py                                     # the demo, a few seconds
  python 08_evaluate_fid.py generate --network <07 run>/network-snapshot-000064.pt --seeds 0-63
  python 08_evaluate_fid.py generate --network <snapshot> --solver ipndm --nfe 10 \\
      --outdir out/08_evaluate_fid/ipndm10                                                # 09: 10 NFE
  python 08_evaluate_fid.py generate --network <snapshot> --guidance 2 \\
      --guide-network <earlier snapshot> --outdir out/08_evaluate_fid/auto2               # 10: autoguidance
  torchrun --standalone --nproc_per_node=8 08_evaluate_fid.py fid \\
      --network edm-cifar10-32x32-cond-vp.pkl \\
      --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
"""

import argparse
import io
import json
import os
import pickle
import re
import sys
import time
import warnings
import zipfile

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.models import inception as tv_inception

import common

# Only common.py at import time: FID (sections 1-5, `demo`, `ref`, `calc`) needs nothing else. Generation
# loads 04 (edm_sampler) and 06 (load_network, +05) when it runs; a flag that asks for more loads its chapter
# in the command-line branch that uses it: 03 for --disc/--schedule/--scaling, 09 for --solver/--nfe/
# --sigma-steps, 10 for --guidance/--guide-network/--guidance-interval. A missing file is one error line
# naming the file to copy (common.load, common.run).

# ----------------------------------------------------------------------------
# 1. The Frechet distance between two Gaussians, in float64.
#
# The troublesome term is tr((S1 S2)^(1/2)). The official code calls scipy's sqrtm
# on the non-symmetric product S1 S2, which returns complex round-off and loses
# accuracy when the covariances are rank-deficient (fewer images than dimensions,
# or dead features). We avoid the non-symmetric matrix altogether:
#
#   write S1 = F1 F1^T, S2 = F2 F2^T (factors from the eigen-decompositions);
#   the eigenvalues of S1 S2 = F1 (F1^T F2 F2^T F1) F1^-1 ... are those of G G^T
#   with G = F1^T F2, so the eigenvalues of (S1 S2)^(1/2) are the singular values
#   of G and tr((S1 S2)^(1/2)) = sum of singular values of G (its nuclear norm).
#
# Singular values are computed to an absolute accuracy of ~eps * |G| and everything
# stays real. The one place where round-off could be amplified is the square root of
# the eigenvalues of S1 and S2 (sqrt(1e-15) = 3e-8), handled in psd_factor.

def psd_factor(sigma):
    """F with F F^T = sigma for a symmetric positive semi-definite matrix (eigen-decomposition).

    Eigenvalues below d * eps * lambda_max are round-off (a zero eigenvalue comes out as
    +-1e-15 or so); they are set to 0, as numpy's matrix_rank does, because their square
    roots (~3e-8 each) would otherwise add up over hundreds of null directions.
    """
    w, v = torch.linalg.eigh(sigma)
    tol = w.max().clamp(min=0) * len(w) * torch.finfo(w.dtype).eps
    return v * torch.where(w > tol, w, 0).sqrt()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2((mu1, sigma1), (mu2, sigma2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    mean_term = (mu1 - mu2).square().sum()
    cross = torch.linalg.svdvals(psd_factor(sigma1).T @ psd_factor(sigma2)).sum()  # tr((S1 S2)^(1/2))
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * cross)


# ----------------------------------------------------------------------------
# 2. Streaming statistics: mean and covariance as float64 sums, mergeable across
# batches and across GPUs (all_reduce of the sums), then finalized once.

class FeatureStats:
    def __init__(self, dim, device="cpu"):
        self.n = torch.zeros([], dtype=torch.float64, device=device)
        self.sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)

    def update(self, features):
        f = features.to(self.sum.device, torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f

    def all_reduce(self):
        """Sum the accumulators of all ranks (a no-op without torch.distributed)."""
        if torch.distributed.is_initialized():
            for t in (self.n, self.sum, self.sum_outer):
                torch.distributed.all_reduce(t)

    def mean_cov(self):
        """(mu, sigma) as float64 numpy arrays; sigma with the unbiased 1/(n-1)."""
        n = self.n.item()
        if n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {int(n)}")
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# ----------------------------------------------------------------------------
# 3. The feature detector: Inception-v3 pool features (2048-d) as FID defines them.
#
# FID is defined by the TF graph `inception-2015-12-05` (2015). It takes images in
# [0, 255] of any size and starts with
#   * a bilinear resize to 299x299 in TF 1.x's convention: output pixel j samples the
#     input at coordinate j * in_size / 299 (no half-pixel centres; the last row and
#     column repeat where the coordinate runs past the image), then
#   * (x - 128) / 128, which maps [0, 255] to [-1, 0.99].
# Two published ports of the graph exist:
#   * NVIDIA's TorchScript port, used by the official EDM/StyleGAN fid code, does both
#     steps itself on uint8 NCHW input. Numbers made with it are comparable with the paper.
#     The official fid.py downloads it as a pickle ("nvidia-pkl"); NVIDIA published the
#     same port earlier as a TorchScript archive (.pt, used by StyleGAN2-ADA's metrics and
#     by clean-fid), which is what we download: torch.jit.load reads it without
#     unpickling arbitrary Python objects.
#   * pytorch-fid's state dict for torchvision's inception_v3. TF's graph differs from
#     torchvision's in its pooling (3x3 average pools divide by the pixels inside the
#     image, not 9; the last block max-pools) and has 1008 classes; patched below, and we
#     apply the graph's own resize and scaling (tf_preprocess) rather than pytorch-fid's
#     torch-style resize, which moves every sample point by up to half an input pixel.

DETECTORS = {
    "nvidia": "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    # The pickle the official fid.py loads; usable only if it embeds a TorchScript archive (see below).
    "nvidia-pkl": "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl",
    "pytorch-fid": "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
}
FEATURE_DIM = 2048
INCEPTION_SIZE = 299


def tf_preprocess(images):
    """uint8 [N, C, H, W] -> float32 [N, C, 299, 299] in [-1, 1), as the TF graph's first ops compute it."""
    n, c, h, w = images.shape
    # Sample points j * in/299 in pixel units, written as grid_sample's [-1, 1] coordinates
    # (align_corners=False: pixel p covers [p, p + 1), so its centre p is at (2p + 1)/in - 1).
    j = torch.arange(INCEPTION_SIZE, dtype=torch.float64, device=images.device)
    gx = (2 * j * w / INCEPTION_SIZE + 1) / w - 1
    gy = (2 * j * h / INCEPTION_SIZE + 1) / h - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).float().expand(n, -1, -1, -1)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


def _tf_pool(x, use_max=False):
    # TF's 3x3 average pool divides by the number of pixels inside the image (count_include_pad=False);
    # the last block of the 2015 graph max-pools instead.
    if use_max:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TFInceptionA(tv_inception.InceptionA):
    """Inception-A block of the TF graph: pool branch averages without the padding."""

    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_pool(x))]


class TFInceptionC(tv_inception.InceptionC):
    """Inception-C block of the TF graph: pool branch averages without the padding."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_tf_pool(x))]


class TFInceptionE(tv_inception.InceptionE):
    """Inception-E block of the TF graph: average pool without the padding, or (last block) max pool."""

    def __init__(self, in_channels, use_max):
        super().__init__(in_channels)
        self.use_max = use_max

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        return [self.branch1x1(x), b3, b3d, self.branch_pool(_tf_pool(x, self.use_max))]


def tf_inception_v3():
    """torchvision's inception_v3 rebuilt as the TF 2015 graph (1008 classes, patched pooling); no weights."""
    A, C, E = TFInceptionA, TFInceptionC, TFInceptionE
    net = tv_inception.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
    net.Mixed_7b, net.Mixed_7c = E(1280, use_max=False), E(2048, use_max=True)
    return net


class TorchvisionDetector(torch.nn.Module):
    """pytorch-fid's weights in the TF graph's layout: uint8 NCHW -> [N, 2048] pool features."""
    feature_dim = FEATURE_DIM

    def __init__(self, state_dict):
        super().__init__()
        self.net = tf_inception_v3()
        self.net.load_state_dict(state_dict)
        self.net.fc = torch.nn.Identity()  # stop at the 2048-d average pool
        self.eval()

    def forward(self, images):
        return self.net(tf_preprocess(images))


class NvidiaDetector(torch.nn.Module):
    """NVIDIA's TorchScript Inception: uint8 NCHW at any resolution -> [N, 2048] pool features. (Another
    TorchScript feature network called the same way may state its own size in a `feature_dim` attribute.)"""

    def __init__(self, script_module):
        super().__init__()
        self.net = script_module.eval()
        self.feature_dim = getattr(script_module, "feature_dim", FEATURE_DIM)

    def forward(self, images):
        return self.net(images, return_features=True)


def load_torchscript(file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": the published detector is TorchScript
        return torch.jit.load(file, map_location="cpu")


def _torchscript_in_pickle(path):
    """Find a TorchScript archive inside NVIDIA's detector pickle without running any of its code.

    The .pkl that the official fid.py loads is written by StyleGAN's `persistence` module:
    unpickling it normally needs their `torch_utils` package and executes Python source
    stored in the file. We never do that. Every class the pickle names is replaced by an
    inert placeholder, and we look for an embedded TorchScript zip (bytes starting 'PK').
    """
    class Inert:
        def __init__(self, *args, **kwargs):
            self.args = args

        def __setstate__(self, state):
            self.state = state

    class InertUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
                return lambda meta: meta
            return Inert

        def persistent_load(self, pid):
            return Inert(pid)

    with open(path, "rb") as f:
        root = InertUnpickler(f).load()

    found, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray)) and obj[:2] == b"PK":
            found.append(bytes(obj))
        elif isinstance(obj, dict):
            todo += list(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo += list(obj)
        elif isinstance(obj, Inert):
            todo += [getattr(obj, "args", None), getattr(obj, "state", None)]
    if not found:
        raise ValueError(f"{path} holds no TorchScript network that can be read without executing code "
                         f"stored in the pickle; use the TorchScript file {DETECTORS['nvidia']} instead")
    return load_torchscript(io.BytesIO(found[0]))


def open_detector_file(path):
    """A detector from a local file: TorchScript (.pt), pytorch-fid state dict (.pth) or NVIDIA's .pkl."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detector file not found: {path}; pass nvidia, nvidia-pkl, pytorch-fid "
                                f"or the path of a downloaded detector")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # TorchScript archives and new-style torch.save files are zips
        if is_zip and any("/code/" in n for n in zipfile.ZipFile(path).namelist()):
            return NvidiaDetector(load_torchscript(path))
        if path.endswith(".pkl"):
            return NvidiaDetector(_torchscript_in_pickle(path))
        return TorchvisionDetector(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read detector {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                         f"is it a complete download of one of {', '.join(DETECTORS)}?") from None


def load_detector(spec, device):
    """`nvidia` (default, the paper's), `nvidia-pkl`, `pytorch-fid`, or a local file path."""
    path = common.download(DETECTORS[spec], f"the Inception detector ({spec})") if spec in DETECTORS else spec
    return open_detector_file(path).to(device)


def features_of(detector, images):
    """[N, C, H, W] uint8 on the detector's device -> [N, D] features (grey images become RGB)."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return detector(images)


# ----------------------------------------------------------------------------
# 4. Image sets: a folder or zip of images through common.py's ImageFolder (the official
# dataset-tool layout, searched recursively, sorted), or CIFAR-10's training set.

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolder:
    """The images of a folder or .zip (recursive, sorted by relative name), decoded only when read.

    `read(i)` gives uint8 [C, H, W]. Without `resolution` every image must have the first one's shape
    (C = 1 greyscale or 3 RGB). With `resolution` R every image is made R x R RGB as the official
    dataset_tool.py's center-crop transform does: the central square (side min(H, W)) is cropped, a greyscale
    image repeated to RGB, and the square resized with PIL's antialiasing LANCZOS filter when it is not R x R;
    `resized` holds the indices of the images that were cropped or resized. Images with an alpha channel are
    refused (so does the official tool): what to composite them on is the user's decision. `labels` come from
    dataset.json (the official dataset-tool layout: {"labels": [["00000/img00000000.png", 6], ...]}), else
    from one sub-folder per class, else None.
    """

    def __init__(self, path, resolution=None):
        self.path, self._zip, self.shape, self.resolution, self.resized = path, None, None, resolution, set()
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r}: no such folder or .zip of images")
        if os.path.isdir(path):
            files = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                     for root, _, names in os.walk(path) for f in names]
        elif zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            files = [n for n in self._zip.namelist() if not n.endswith("/")]
        else:
            raise ValueError(f"{path!r} is neither a folder nor a .zip file of images")
        self._files = set(files)
        self.names = sorted(n for n in files if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.names:
            raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {path!r}")
        self.shape = self.read(0).shape                 # every later image must match the first

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
                alpha = "A" in image.getbands() or "transparency" in image.info
                if not alpha:
                    image = image.convert("L" if image.mode in ("L", "I;16", "I", "1") else "RGB")
                    array = np.array(image if self.resolution is None else self._square(image.convert("RGB"), i))
        except Exception as error:   # a damaged file can raise many kinds
            raise ValueError(f"cannot read image {name!r} in {self.path!r} ({type(error).__name__}: {error})")
        if alpha:
            raise ValueError(f"{name!r} in {self.path!r} has an alpha channel (transparency); convert it to RGB "
                             f"first (e.g. composite it on a background of your choice)")
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if self.shape is not None and array.shape != self.shape:
            size = lambda s: f"{s[2]}x{s[1]} with {s[0]} channel(s)"
            raise ValueError(f"{name!r} is {size(array.shape)} but {self.names[0]!r} is {size(self.shape)}; "
                             f"all images in {self.path!r} must have one size and channel count")
        return array

    def _square(self, image, i):
        """The official center crop: the central min(W, H) square, resized (LANCZOS) to resolution^2 if needed."""
        import PIL.Image
        w, h = image.size
        side, r = min(w, h), self.resolution
        if (w, h) != (r, r):
            self.resized.add(i)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        return image.resize((r, r), PIL.Image.Resampling.LANCZOS) if side != r else image

    def batch(self, indices):
        """Images `indices` as a uint8 tensor [N, C, H, W]."""
        return torch.from_numpy(np.stack([self.read(int(i)) for i in indices]))

    @property
    def labels(self):
        """int64 [N] class indices, or None."""
        if "dataset.json" in self._files:
            labels = dict(json.loads(self._bytes("dataset.json")).get("labels") or [])
            missing = [n for n in self.names if n not in labels]
            if labels and missing:
                raise ValueError(f"dataset.json in {self.path!r} has no label for {missing[0]!r}")
            return np.asarray([labels[n] for n in self.names], np.int64) if labels else None
        folders = [n.split("/")[0] if "/" in n else None for n in self.names]
        if None in folders or len(set(folders)) < 2:
            return None
        return np.unique(folders, return_inverse=True)[1].astype(np.int64)   # index of the sorted folder name



class TensorImages:
    """uint8 images [N, C, H, W] held in memory (CIFAR-10), with ImageFolder's `len` and `batch`."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def batch(self, indices):
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


SHAPES_SIZE = 4096         # images in 07's shapes training set (07's load_dataset; a test keeps them equal)
GRID, SETTINGS = "grid.png", "generation.json"     # what `generate` writes beside its images


def open_folder(path):
    """common.ImageFolder, without the grid.png that `generate` writes beside its images (a folder with
    its generation.json): `calc` and `ref` read the generated images only."""
    folder = ImageFolder(path)
    if GRID in folder.names and os.path.isfile(os.path.join(path, SETTINGS)):
        folder.names.remove(GRID)
    return folder


def open_images(spec, data_dir, resolution=None):
    """Any --data that 07 trains on: `cifar10` (the 50,000 training images, looked for in data_dir),
    `shapes` (07's built-in set, `resolution` pixels square, default 16 as 07's) or a folder/.zip of
    images (with `resolution`: checked to be that size, as 07 checks)."""
    if spec == "cifar10":
        images = TensorImages(common.load("07_train_cifar10").load_cifar10(data_dir)[0])
    elif spec == "shapes":     # drawn by 07's code, so the reference is the very training set of a 07 run
        shapes = common.load("07_train_cifar10").make_shapes_dataset(SHAPES_SIZE, resolution or 16)[0]
        return TensorImages(shapes)
    else:
        images = open_folder(spec)
    size = images.batch([0]).shape[-1]
    if resolution is not None and size != resolution:
        raise ValueError(f"the images in {spec} are {size}x{size}, not --resolution {resolution} (for image "
                         f"data --resolution is a check, as in 07); pass the resolution the network was trained at")
    return images


def random_subset(n_total, num, seed):
    """The official rule: all images if there are exactly `num`, else a seeded random subset, sorted."""
    idx = np.arange(n_total)
    if n_total > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx


# ----------------------------------------------------------------------------
# 5. Ranks and progress: plain `python` is one rank; under torchrun each rank takes
# every world_size-th batch, and rank 0 reports.

def print0(*args):
    if common.get_rank() == 0:
        print(*args, flush=True)


def rank_batches(items, batch_size):
    """Split items into batches of at most batch_size, dealt round-robin to the ranks (as the official code).

    Every rank gets the same number of batches (some possibly empty), so collective calls line up.
    """
    world = common.get_world_size()
    num_batches = ((len(items) - 1) // (batch_size * world) + 1) * world
    return torch.as_tensor(items).tensor_split(num_batches)[common.get_rank()::world]


def progress(batches, what, lines=10):
    """Iterate over `batches`; rank 0 shows a tqdm bar on a terminal, else about `lines` plain lines
    (so that `... > log.txt` gives a readable log rather than one long line of bar redraws)."""
    if common.get_rank() != 0:
        yield from batches
    elif sys.stdout.isatty():
        import tqdm
        yield from tqdm.tqdm(batches, desc=what, unit="batch", dynamic_ncols=True)
    else:
        total, start = len(batches), time.time()
        every = max(1, -(-total // lines))
        for i, batch in enumerate(batches, 1):
            yield batch
            if i % every == 0 or i == total:
                print(f"  {what}: batch {i}/{total}, {time.time() - start:.1f} s", flush=True)


# ----------------------------------------------------------------------------
# 6. Generating images, each a function of its seed only.

def parse_seeds(text):
    """'0-49999' or '0,5,7-9' -> a list of ints (ranges inclusive, as the official code)."""
    seeds = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad seed list {text!r}; use e.g. 0-49999 or 0,5,7-9")
        seeds += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return seeds


def generate_batch(net, seeds, device, sample=None, class_idx=None):
    """uint8 images [N, C, H, W] for the given seeds, each depending on its own seed only.

    As in the official generate.py, each seed's generator first draws the latents, then (for a conditional
    network) the class label, then the sampler's noise. `sample(net, latents, extra_args, randn_like)` is a
    sampler as 03's, 04's and 09's make_sampler make them (default: 04's Algorithm 2, 18 steps = 35 NFE).
    """
    rnd = common.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            class_labels = torch.zeros_like(class_labels)
            class_labels[:, class_idx] = 1
    sample = sample or common.load("04_stochastic_sampler").make_sampler()
    with torch.no_grad():
        x = sample(net, latents, {"class_labels": class_labels}, rnd.randn_like)
    return common.to_uint8(x).permute(0, 3, 1, 2)


def load_net(path, device):
    """A network from 06's load_network (official pickles or this project's snapshots)."""
    if not re.match(r"https?://", path) and not os.path.isfile(path):
        raise FileNotFoundError(f"network file not found: {path}; pass an official .pkl (path or URL) "
                                f"or a 07 snapshot (<run>/network-snapshot-*.pt)")
    try:
        net = common.load("06_unet").load_network(path)  # also downloads official URLs into a cache
    except (ValueError, OSError):
        raise                   # 06's own messages name the file and what is wrong with it
    except Exception as e:      # e.g. an unsafe or foreign pickle; name the file and the reason
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot load network {path} ({type(e).__name__}: {reason}); pass an official "
                         f".pkl or a 07 snapshot") from None
    return net.eval().requires_grad_(False).to(device)


def check_class(net, class_idx):
    if class_idx is not None and not (net.label_dim and class_idx < net.label_dim):
        raise ValueError(f"--class {class_idx} but the network has {net.label_dim} classes")


def png_path(outdir, seed, subdirs):
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


def generate_pngs(net, seeds, outdir, batch_size, device, subdirs=False, class_idx=None, sample=None):
    """Write {seed:06d}.png for this rank's share of the seeds."""
    for batch_seeds in progress(rank_batches(seeds, batch_size), "generate"):
        if len(batch_seeds) == 0:
            continue
        images = generate_batch(net, batch_seeds.tolist(), device, sample, class_idx)
        for seed, image in zip(batch_seeds.tolist(), images.permute(0, 2, 3, 1)):
            path = png_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            PIL.Image.fromarray(image.numpy().squeeze(2) if image.shape[2] == 1 else image.numpy()).save(path)


# ----------------------------------------------------------------------------
# 7. Statistics of generated images (no PNGs written) and of image sets.

def generated_stats(net, seeds, detector, batch_size, device, class_idx=None, sample=None):
    """(mu, sigma) of the detector features of the images `generate` would write for these seeds."""
    stats = FeatureStats(detector.feature_dim, device)
    for batch_seeds in progress(rank_batches(seeds, batch_size), "generate + features"):
        if len(batch_seeds):
            images = generate_batch(net, batch_seeds.tolist(), device, sample, class_idx)
            stats.update(features_of(detector, images.to(device)))
    stats.all_reduce()
    return stats.mean_cov()


def image_stats(images, indices, detector, batch_size, device):
    """(mu, sigma) of the detector features of images[indices], split across ranks."""
    stats = FeatureStats(detector.feature_dim, device)
    for batch in progress(rank_batches(indices, batch_size), "features"):
        if len(batch):
            stats.update(features_of(detector, images.batch(batch).to(device)))
    stats.all_reduce()
    return stats.mean_cov()


def load_ref(spec, feature_dim=None):
    """Reference statistics (mu [d], sigma [d, d]) from an .npz path or URL (e.g. the official fid-refs),
    checked: readable, consistent, and (given feature_dim) of the detector's feature size."""
    path = common.download(spec, "the reference statistics") if re.match(r"https?://", spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics not found: {path}; make them with the `ref` "
                                f"subcommand or pass an official fid-refs .npz (path or URL)")
    try:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a reference .npz with arrays 'mu' and 'sigma' ({e})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path} is not a reference .npz: 'mu' is {list(mu.shape)} and 'sigma' {list(sigma.shape)}, "
                         f"not [d] and [d, d]; make it with the `ref` subcommand")
    if feature_dim is not None and len(mu) != feature_dim:
        raise ValueError(f"reference {path} has {len(mu)}-d statistics but the detector gives "
                         f"{feature_dim}-d features; it was made with a different detector")
    return mu, sigma


def ref_and_detector(ref_spec, detector_spec, device):
    """(reference statistics, detector) for calc and fid. --ref is checked first -- it exists, reads, and
    has the 2048-d features of every published detector -- because loading a published detector may be
    a download; a local detector file is read first, and the reference checked against its features."""
    if detector_spec in DETECTORS:
        ref = common.rank0_first(load_ref, ref_spec, FEATURE_DIM)
        detector = common.rank0_first(load_detector, detector_spec, device)
    else:
        detector = load_detector(detector_spec, device)
        ref = common.rank0_first(load_ref, ref_spec, detector.feature_dim)
    return ref, detector


# ----------------------------------------------------------------------------
# 8. From command-line options to a sampler and a denoiser. The chapters that own them build them: 04
# (Algorithm 2, the default), 03 (--disc/--schedule/--scaling: the ablation sampler), 09 (--solver, --nfe,
# --sigma-steps) -- each chapter's make_sampler(...) gives sample(net, latents, extra_args, randn_like) with
# `.settings` for the JSON records -- and 10 (--guidance ...). A later chapter is loaded only by the flag
# that asks for it (the house rule lets the command line use later chapters).

CHURN_OPTIONS = ("S_churn", "S_min", "S_max", "S_noise")
SOLVER_NAMES = ("euler", "heun", "dpmpp2m", "dpmpp3m", "ipndm")  # 09's SOLVERS, for --help without 09 (tested)
SIGMA_STEP_KINDS = ("edm", "logsnr", "time_uniform")            # 09's sigma_steps kinds


def flag(name):
    """The option of a sampler setting: sigma_min -> --sigma-min, S_churn -> --S-churn (dashes, the paper's case)."""
    return "--" + name.replace("_", "-")


def sampler_from_args(args):
    """The sampler the command line asks for (see section 8's comment), checked before anything runs."""
    steps = {k: getattr(args, k) for k in ("sigma_min", "sigma_max", "rho") if getattr(args, k) is not None}
    churn = {k: getattr(args, k) for k in CHURN_OPTIONS if getattr(args, k) is not None}
    for name, value in steps.items():
        if value <= 0:
            raise ValueError(f"{flag(name)} must be positive, got {value}")
    if steps.get("sigma_min", 0) >= steps.get("sigma_max", float("inf")):
        raise ValueError(f"--sigma-min {steps['sigma_min']} must be below --sigma-max {steps['sigma_max']}")
    solver = args.solver or "heun"
    num_steps = args.num_steps
    if args.nfe is not None:
        num_steps = common.load("09_fast_samplers").steps_for_nfe(solver, args.nfe)      # 09's NFE rule
    if args.discretization or args.schedule or args.scaling:
        if solver not in ("euler", "heun"):
            raise ValueError(f"--disc/--schedule/--scaling run chapter 03's ablation sampler, whose --solver is "
                             f"euler or heun, not {solver}")
        if args.sigma_steps:
            raise ValueError("--sigma-steps chooses the steps of 09's solvers; the ablation sampler's are --disc")
        ablation = {k: getattr(args, k) for k in ("discretization", "schedule", "scaling") if getattr(args, k)}
        return common.load("03_heun_and_schedules").make_sampler(num_steps or 18, solver=solver, **ablation,
                                                                  **steps, **churn)
    if solver == "heun" and args.sigma_steps is None:
        return common.load("04_stochastic_sampler").make_sampler(num_steps or 18, **steps, **churn)
    if churn:
        raise ValueError(f"{flag(next(iter(churn)))} is Algorithm 2's churn (04's sampler: --solver heun without "
                         f"--sigma-steps); 09's {solver} is deterministic")
    return common.load("09_fast_samplers").make_sampler(solver, num_steps=num_steps, kind=args.sigma_steps, **steps)


def denoiser_from_args(args, net, device):
    """(denoiser, counters, settings): the denoiser the sampler calls -- `net`, or `net` guided as
    --guidance, --guide-network and --guidance-interval say (chapter 10) -- with a common.CountingDenoiser
    on each network (so that the guide's evaluations are counted too) and the settings for fid.json.
    """
    main_net = common.CountingDenoiser(net)
    settings = dict(w=args.guidance, method="none", guide_network=None, interval=None)
    if args.guidance == 1 and args.guide_network is None and args.guidance_interval is None:
        return main_net, [main_net], settings
    guidance = common.load("10_guidance")  # a later chapter: only the command line guides
    interval = None if args.guidance_interval is None else guidance.parse_interval(args.guidance_interval)
    if args.guide_network is None:                                   # CFG: the same network without its class
        counters, guide = [main_net], None
        settings.update(method="cfg")
        warning = guidance.label_dropout_warning(args.network) if args.guidance != 1 else None
        if warning and common.get_rank() == 0:
            print(warning, file=sys.stderr, flush=True)
    else:                                                            # autoguidance: a weaker network of the task
        guide = common.CountingDenoiser(common.rank0_first(load_net, args.guide_network, device))
        check_same_task(net, guide, args.guide_network)
        counters = [main_net, guide]
        settings.update(method="autoguidance", guide_network=os.path.abspath(args.guide_network))
    settings.update(interval=None if interval is None else list(interval))
    return guidance.guided(main_net, args.guidance, guide, interval), counters, settings


def check_same_task(net, guide, path):
    """Autoguidance needs a guide for the same images and classes as the main network."""
    shape = lambda n: f"{n.img_resolution}x{n.img_resolution}x{n.img_channels} with {n.label_dim} classes"
    if shape(guide) != shape(net):
        raise ValueError(f"guide network {path} makes {shape(guide)} images, the main network {shape(net)}; "
                         f"autoguidance needs a (weaker) network of the same task")


def sampler_line(sample, guidance):
    """One line for the log: the sampler, its options, the guidance."""
    settings = sample.settings
    options = "".join(f", {k}={v}" for k, v in settings["options"].items())
    line = f"{settings['function']}: {settings['solver']} on {settings['sigma_steps']} steps{options}; "
    if guidance["method"] == "none":
        return line + "no guidance"
    by = "CFG" if guidance["method"] == "cfg" else f"autoguidance by {guidance['guide_network']}"
    where = "" if guidance["interval"] is None else " for sigma in [{:g}, {:g}]".format(*guidance["interval"])
    return line + f"{by}, w = {guidance['w']:g}{where}"


# ----------------------------------------------------------------------------
# 9. Subcommands. Each checks everything it reads (network, detector, reference,
# images) before it writes anything.

def cmd_generate(args):
    _, _, device = common.init_distributed(args.device)
    seeds = parse_seeds(args.seeds)
    sample = sampler_from_args(args)
    net = common.rank0_first(load_net, args.network, device)
    check_class(net, args.class_idx)
    denoiser, counters, guidance = denoiser_from_args(args, net, device)
    outdir = args.outdir or os.path.join("out", "08_evaluate_fid", "images")
    earlier = check_outdir(outdir, seeds, args.subdirs, args.add)
    outdir = common.out_dir(__file__, outdir)
    print0(f"Generating {len(seeds)} images into {outdir} ({sampler_line(sample, guidance)})...")
    counter, start = common.CountingDenoiser(denoiser), time.time()
    generate_pngs(counter, seeds, outdir, args.batch, device, args.subdirs, args.class_idx, sample)
    common.gather(None)             # every rank's images are written before rank 0 draws the grid
    if common.get_rank() == 0:      # rank 0 always has images (other ranks may have none): its count is the NFE
        images = rank_images(seeds, args.batch)
        nfe, evaluations = counter.per_image(images), sum(c.per_image(images) for c in counters)
        settings = sample.settings
        common.write_json(earlier + [dict(
            network=location(args.network), seeds=args.seeds, num_images=len(seeds), subdirs=args.subdirs,
            class_idx=args.class_idx, solver=settings["solver"], sigma_steps=settings["sigma_steps"], nfe=nfe,
            network_evaluations=evaluations, sampler={"function": settings["function"], "options": settings["options"]},
            guidance=guidance, gpus=common.get_world_size(), seconds=round(time.time() - start, 1))],
            os.path.join(outdir, SETTINGS))
        grid = save_folder_grid(outdir)
        print(f"Done: {len(seeds)} PNGs in {outdir}, {nfe} NFE per image (measured; {evaluations} network "
              f"evaluations{GUIDANCE_COST * (evaluations != nfe)}); settings in {SETTINGS}, the first images in "
              f"{grid}. Their FID: `08_evaluate_fid.py calc --images {outdir} --ref <ref.npz> -n "
              f"{len(seeds)}` (the paper's protocol needs 50,000: `fid`).")


# Why network evaluations can exceed NFE (the sampler's denoiser calls, as the paper counts them).
GUIDANCE_COST = ": each guided call evaluates two networks -- CFG the network with and without its class, " \
                "autoguidance the main and the guide network"


def location(path):
    """A network or file as generation.json and fid.json record it: a URL as given, a path made absolute."""
    return path if re.match(r"https?://", path) else os.path.abspath(path)


def check_outdir(outdir, seeds, subdirs, add):
    """generate never replaces a file: it writes into a new or empty folder, or, with --add, into one that
    has none of these seeds' images. Every rank checks its view of the folder (nodes may have their own)
    before any writes. Returns the generation.json entries already there (to be extended)."""
    problem, earlier = None, []
    if os.path.isdir(outdir) and os.listdir(outdir):
        taken = [s for s in seeds if os.path.exists(png_path(outdir, s, subdirs))]
        if not add:
            problem = (f"{outdir} is not empty (an earlier generate?) and generate never overwrites; pass a new "
                       f"--outdir, or --add to add images of other seeds to it")
        elif taken:
            problem = (f"{png_path(outdir, taken[0], subdirs)} exists ({len(taken)} of these seeds' images do) and "
                       f"--add never replaces images; pass seeds not yet in {outdir}, or a new --outdir")
        elif os.path.isfile(os.path.join(outdir, SETTINGS)):
            with open(os.path.join(outdir, SETTINGS)) as f:
                try:
                    earlier = json.load(f)
                except ValueError:
                    earlier = None
            if not isinstance(earlier, list):
                problem = f"{os.path.join(outdir, SETTINGS)} is not generate's list of settings; pass a new --outdir"
    problems = [p for p in common.gather(problem) if p]
    if problems:
        raise FileExistsError(problems[0])
    return earlier


def save_folder_grid(outdir, count=64):
    """grid.png of the folder's first `count` images (by name: the lowest seeds), 8 per row."""
    import torchvision
    folder = open_folder(outdir)
    ncol = min(8, len(folder))
    images = folder.batch(range(min(count, len(folder)) // ncol * ncol)).float() / 255   # whole rows of ncol
    scale = max(1, -(-512 // (ncol * images.shape[-1])))             # at least 512 pixels wide, pixels sharp
    path = os.path.join(outdir, GRID)
    torchvision.utils.save_image(F.interpolate(images, scale_factor=scale), path, nrow=ncol, padding=scale,
                                 pad_value=1)
    return path


def rank_images(seeds, batch_size):
    """How many of the seeds this rank generates."""
    return sum(len(batch) for batch in rank_batches(seeds, batch_size))


def cmd_ref(args):
    _, _, device = common.init_distributed(args.device)
    # One process per node downloads CIFAR-10.
    images = common.rank0_first(open_images, args.data, args.data_dir, args.resolution)
    if len(images) < 2:
        raise ValueError(f"found {len(images)} image in {args.data}; need at least 2 for a covariance")
    detector = common.rank0_first(load_detector, args.detector, device)
    print0(f"Computing statistics of {len(images)} images from {args.data}...")
    mu, sigma = image_stats(images, np.arange(len(images)), detector, args.batch, device)
    if common.get_rank() == 0:
        with common.atomic_open(args.dest) as f:   # a reader never sees half a file
            np.savez(f, mu=mu, sigma=sigma)
        print(f"Saved reference statistics to {args.dest}")


def cmd_calc(args):
    _, _, device = common.init_distributed(args.device)
    images = open_folder(args.images)
    if len(images) < args.num:
        raise ValueError(f"found {len(images)} images in {args.images}, but --num is {args.num}; "
                         f"generate more or pass a smaller -n")
    ref, detector = ref_and_detector(args.ref, args.detector, device)
    print0(f"Computing statistics of {args.num} of the {len(images)} images in {args.images}...")
    mu, sigma = image_stats(images, random_subset(len(images), args.num, args.seed), detector, args.batch, device)
    if common.get_rank() == 0:
        print(f"FID {frechet_distance(mu, sigma, *ref):g}")


def cmd_fid(args):
    _, _, device = common.init_distributed(args.device)
    sample = sampler_from_args(args)
    net = common.rank0_first(load_net, args.network, device)
    check_class(net, args.class_idx)
    denoiser, counters, guidance = denoiser_from_args(args, net, device)
    ref, detector = ref_and_detector(args.ref, args.detector, device)
    path = os.path.join(common.out_dir(__file__, args.outdir), "fid.json")   # a bad --outdir fails now, not at the end
    counter = common.CountingDenoiser(denoiser)              # the sampler's calls: NFE as the paper counts it
    start, result, images = time.time(), {"fid": [], "seeds": []}, 0
    print0(sampler_line(sample, guidance))
    for k in range(args.repeats):
        seeds = list(range(k * args.num, (k + 1) * args.num))
        print0(f"Seeds {seeds[0]}-{seeds[-1]}: generating {args.num} images into statistics...")
        mu, sigma = generated_stats(counter, seeds, detector, args.batch, device, args.class_idx, sample)
        images += rank_images(seeds, args.batch)
        result["fid"].append(frechet_distance(mu, sigma, *ref))
        result["seeds"].append(f"{seeds[0]}-{seeds[-1]}")
        print0(f"  FID {result['fid'][-1]:g}")
    if common.get_rank() == 0:      # rank 0 always has images (other ranks may have none): its count is the NFE
        settings = sample.settings
        result.update(fid_min=min(result["fid"]), solver=settings["solver"], sigma_steps=settings["sigma_steps"],
                      nfe=counter.per_image(images),
                      network_evaluations=sum(c.per_image(images) for c in counters), guidance=guidance,
                      class_idx=args.class_idx,
                      sampler={"function": settings["function"], "options": settings["options"]},
                      num_images=args.num, network=location(args.network), ref=args.ref,
                      detector=args.detector, gpus=common.get_world_size(), seconds=round(time.time() - start, 1))
        common.write_json(result, path)
        print(f"FID min of {args.repeats}: {result['fid_min']:g} at {result['nfe']} NFE per image, measured "
              f"({result['network_evaluations']} network evaluations"
              f"{GUIDANCE_COST * (result['network_evaluations'] != result['nfe'])}); result in {path}")


# ----------------------------------------------------------------------------
# 10. The demo: Frechet distance on Gaussian "features" whose true FID is known.
#
# FID is estimated from n images, and the estimate is biased upward (even two sets
# drawn from the same distribution give FID > 0) by terms that shrink like 1/n. That
# is why FIDs are only comparable at the same n (50k) and why the paper repeats the
# measurement with three seed sets and reports the minimum.

def demo(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device, outdir = common.start(__file__, args)
    d = 64
    g = torch.Generator().manual_seed(args.seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # a shared eigenbasis
    lam = torch.linspace(0.1, 2.0, d, dtype=torch.float64) ** 2                 # real-image covariance spectrum
    mu_shift = torch.full([d], 0.05, dtype=torch.float64)
    sigma_r = q @ torch.diag(lam) @ q.T
    sigma_g = q @ torch.diag(lam * 1.1) @ q.T                                    # generator: 10% too much variance
    true_fid = float(mu_shift.square().sum() + (lam.sqrt() - (1.1 * lam).sqrt()).square().sum())
    print(f"{d}-d Gaussian 'features'; the generator's mean is off by 0.05 and its variance 10% too large.")
    print(f"Closed-form FID(generator, real) = {true_fid:.5f}; each estimate below uses n samples "
          f"against the exact real statistics.")

    factors = {"real": psd_factor(sigma_r), "gen": psd_factor(sigma_g)}

    def sample_stats(which, mean, n):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ factors[which].T + mean
        s = FeatureStats(d, device)
        s.update(x)
        return s.mean_cov()

    ns = [500, 1000, 2000, 5000, 10000, 20000, 50000]
    rows = []
    print(f"{'n':>6} {'FID(real vs real)':>18} {'n x bias':>9} {'FID(gen vs real), 3 seed sets':>31} {'min':>8}")
    for n in ns:
        same = frechet_distance(*sample_stats("real", 0, n), np.zeros(d), sigma_r)
        three = [frechet_distance(*sample_stats("gen", mu_shift, n), np.zeros(d), sigma_r) for _ in range(3)]
        rows.append((n, same, three))
        print(f"{n:6d} {same:18.5f} {n * same:9.1f} {' '.join(f'{v:9.5f}' for v in three):>31} {min(three):8.5f}")

    path = os.path.join(outdir, "fid_vs_n.png")
    plot_fid_vs_n(plt, ns, rows, true_fid, path)
    spread = max(rows[-1][2]) - min(rows[-1][2])
    print(f"\nWhat this shows ({path}):")
    print(f"  * Blue: two samples of the SAME distribution still score FID > 0, and that bias falls like 1/n "
          f"(n x bias stays near {rows[-1][1] * rows[-1][0]:.0f}; grey guide).")
    print(f"  * Orange: the generator's estimates sit above its true FID {true_fid:.3f} (dashed line) by about the "
          f"same bias; at n = 50k the three seed sets differ by only {spread:.4f}.")
    print("  * So FIDs are comparable only at equal n: the paper's FIDs (Table 2) all use 50,000 images, and each is"
          " the minimum over 3 seed sets (official README) to damp the remaining noise.")
    print("Next: measure a network the same way, e.g. a 07 snapshot:")
    print("  python 08_evaluate_fid.py generate --network <run>/network-snapshot-XXXXXX.pt --seeds 0-63   # PNGs")
    print("  python 08_evaluate_fid.py fid --network <snapshot or official .pkl> --ref <ref.npz>         # FID, 3 x 50k")


def plot_fid_vs_n(plt, ns, rows, true_fid, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    same = np.array([r[1] for r in rows])
    ax.loglog(ns, same, "o-", color="C0", label="same distribution (true FID 0)")
    c = same[-1] * ns[-1]
    ax.loglog(ns, [c / n for n in ns], "-", color="0.75", lw=6, zorder=0, label=f"{c:.0f} / n (guide)")
    for i in range(3):
        ax.loglog(ns, [r[2][i] for r in rows], "s", ms=4, color="C1", alpha=0.8,
                  label="generator, 3 seed sets" if i == 0 else None)
    ax.axhline(true_fid, color="C1", ls="--", label=f"generator, true FID {true_fid:.3f}")
    ax.set_xticks(ns, [f"{n // 1000}k" if n >= 1000 else str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("number of images n")
    ax.set_ylabel("FID estimate (64-d Gaussian features)")
    ax.set_title("FID is biased upward by ~1/n: compare only at equal n (50k)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------
# 11. Memorisation: is each generated image new, or a copy of a training image?
#
# A network trained long on few images learns to reproduce them. Following Carlini et al. (2023,
# "Extracting training data from diffusion models"), a generated image counts as a near-copy when its
# nearest training image is much closer than the second nearest: d1 < d2 / 3 (L2 in pixel space). The
# ratio, not d1 alone, is the test: a plain image is close to many training images, a copy to one.

NEAR_COPY_RATIO = 3


def nearest_two(images, train, chunk=4096):
    """For uint8 images [N, C, H, W]: (d [N, 2], idx [N, 2]) -- the RMS pixel distance (0-255 scale) to their two
    nearest images in `train` (ImageFolder-like: len, batch) and those images' indices, nearest first."""
    x = images.flatten(1).to(torch.float64)
    best_d, best_i = torch.zeros([len(x), 0], dtype=torch.float64), torch.zeros([len(x), 0], dtype=torch.long)
    for start in range(0, len(train), chunk):
        idx = torch.arange(start, min(start + chunk, len(train)))
        d = torch.cdist(x, train.batch(idx).flatten(1).to(torch.float64)) / x.shape[1] ** 0.5
        best_d, order = torch.cat([best_d, d], 1).topk(2, dim=1, largest=False)
        best_i = torch.cat([best_i, idx.expand(len(x), -1)], 1).gather(1, order)
    return best_d, best_i


def near_copies(d):
    """Which rows of nearest_two's distances are near-copies: d1 < d2 / 3."""
    return d[:, 0] < d[:, 1] / NEAR_COPY_RATIO


def training_images(spec, data_dir, resolution):
    """--data of `nearest`: what 07 trained on -- cifar10, shapes (07's built-in set, re-drawn) or a folder/.zip,
    center-cropped and resized to the generated images' resolution as 07 --resolution does."""
    if spec == "shapes":
        return TensorImages(common.load("07_train_cifar10").make_shapes_dataset(4096, resolution)[0])
    return TensorImages(common.load("07_train_cifar10").load_cifar10(data_dir)[0]) if spec == "cifar10" else \
        ImageFolder(spec, resolution)


def nearest_inputs(args):
    """(names, uint8 images [N, C, H, W], training set) for `nearest`; every check before anything is written."""
    if not args.data:
        raise ValueError("nearest needs --data: the training images (a folder/.zip, cifar10 or shapes)")
    if (args.network is None) == (args.images is None):
        raise ValueError("nearest needs either --network SNAPSHOT (to generate --seeds) or --images DIR")
    if args.images:
        folder = ImageFolder(args.images)
        images, names = folder.batch(range(len(folder))), folder.names
    else:
        device, seeds = common.get_device(args.device), parse_seeds(args.seeds)
        net = load_net(args.network, device)
        sample = common.load("04_stochastic_sampler").make_sampler(args.num_steps or 18)
        print(f"Generating {len(seeds)} images with 04's edm_sampler, {args.num_steps or 18} steps...")
        images = torch.cat([generate_batch(net, batch.tolist(), device, sample).cpu()
                            for batch in torch.as_tensor(seeds).split(args.batch)])
        names = [f"seed {s}" for s in seeds]
    train = training_images(args.data, args.data_dir, images.shape[-1])
    if len(train) < 2:
        raise ValueError(f"{args.data!r} holds {len(train)} image; the check needs at least 2 training images")
    if train.batch([0]).shape[1:] != images.shape[1:]:
        raise ValueError(f"the training images are {tuple(train.batch([0]).shape[1:])} (C, H, W) but the "
                         f"generated ones {tuple(images.shape[1:])}; pass the --data the network was trained on")
    return names, images, train


def cmd_nearest(args):
    names, images, train = nearest_inputs(args)
    print(f"Finding each image's 2 nearest among {len(train)} training images ({args.data})...")
    d, idx = nearest_two(images, train)
    copies = near_copies(d)
    outdir = common.out_dir(__file__, args.outdir or os.path.join("out", "08_evaluate_fid", "nearest"))
    shown = d[:, 0].div(d[:, 1]).argsort()[:args.rows]          # the most copy-like first
    grid = torch.stack([images[shown], train.batch(idx[shown, 0]), train.batch(idx[shown, 1])], 1).flatten(0, 1)
    common.load("07_train_cifar10").save_grid(grid, os.path.join(outdir, "nearest.png"),
                     f"near-copies (d1 < d2/{NEAR_COPY_RATIO}): {int(copies.sum())} of {len(images)}", ncol=3,
                     min_width=240, column_labels=["generated", "1st nearest", "2nd nearest"],
                     row_labels=[f"{names[i]}: {d[i, 0]:.1f} | {d[i, 1]:.1f}" + " copy" * bool(copies[i])
                                 for i in shown.tolist()])
    result = dict(criterion=f"d1 < d2 / {NEAR_COPY_RATIO} (Carlini et al. 2023)",
                  distance="RMS pixel difference, 0-255", near_copies=int(copies.sum()), images=len(images),
                  near_copy_fraction=float(copies.float().mean()), data=args.data,
                  source=os.path.abspath(args.network or args.images),
                  per_image=[dict(name=n, d1=float(a), d2=float(b), nearest=[int(i), int(j)], near_copy=bool(c))
                             for n, (a, b), (i, j), c in zip(names, d, idx, copies)])
    common.write_json(result, os.path.join(outdir, "nearest.json"))
    print(f"Near-copies (d1 < d2 / {NEAR_COPY_RATIO}, Carlini et al. 2023): {result['near_copies']} of "
          f"{len(images)} = {result['near_copy_fraction']:.1%}; median d1 {d[:, 0].median():.1f}, d2 "
          f"{d[:, 1].median():.1f} (RMS, 0-255). Grid (the {len(shown)} most copy-like, d1 | d2 per row): "
          f"{os.path.join(outdir, 'nearest.png')}; every image: nearest.json")


# ----------------------------------------------------------------------------
# Command line: one parser per subcommand, each with exactly its own options.

TORCHRUN_NUM = "under torchrun write -n, as torchrun mistakes --num for its --numa-binding"


def add_device(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto; under torchrun "
                   "each rank takes the GPU of its LOCAL_RANK)")


def add_network(p):
    p.add_argument("--network", required=True, help="an official .pkl (path or URL) or a 07 snapshot "
                   "(<run>/network-snapshot-*.pt)")
    p.add_argument("--class", dest="class_idx", metavar="LABEL", type=common.number(int, 0), default=None,
                   help="class label for every image (default: random per seed)")
    p.add_argument("--batch", type=common.number(int, 1), default=64, help="maximum batch size per GPU (default: 64)")


def add_sampler_options(p):
    """The solver and its budget (04's Algorithm 2 by default, 09's solvers, 03's ablation sampler) and guidance (10)."""
    g = p.add_argument_group("sampler (default: 04's Algorithm 2, Heun on Eq. 5's steps, 18 steps = 35 NFE)")
    g.add_argument("--solver", choices=SOLVER_NAMES, help="heun: 04's Algorithm 2 (with --S-churn ...; with "
                   "--sigma-steps: 09's Heun); the others: chapter 09's deterministic solvers on their authors' "
                   "sigma steps; with --disc/--schedule/--scaling: 03's ablation sampler, euler or heun")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--steps", dest="num_steps", metavar="N", type=common.number(int, 2), default=None,
                        help="sampling steps N (default: 18)")
    budget.add_argument("--nfe", metavar="N", type=common.number(int, 1), default=None,
                        help="network evaluations per image instead of --steps: N = 2 steps - 1 for heun "
                        "(odd), N = steps for the others")
    g.add_argument("--sigma-steps", choices=SIGMA_STEP_KINDS, help="09's step kinds: edm (Eq. 5, rho = 7), logsnr "
                   "(uniform in log sigma), time_uniform (uniform in VP's t^(1/rho), rho = 1) (default: the "
                   "solver's own: logsnr for dpmpp2m/dpmpp3m, else edm)")
    # Dashed names like every other option, the paper's symbols in its case; the underscore spellings
    # (--sigma_min, --S_churn: the official generate.py's keyword names) still work.
    aliases = lambda name: [flag(name)] + [f"--{name}"] * ("_" in name)
    for name in ("sigma_min", "sigma_max", "rho"):
        g.add_argument(*aliases(name), dest=name, metavar=name.upper(), type=common.number(float, 0), default=None,
                       help="Eq. 5 (must be > 0)" + "; also the exponent of time_uniform steps" * (name == "rho"))
    for name in CHURN_OPTIONS:
        g.add_argument(*aliases(name), dest=name, metavar=name.upper(), type=common.number(float, 0), default=None,
                       help="Algorithm 2 stochasticity")
    g.add_argument("--disc", dest="discretization", choices=["vp", "ve", "iddpm", "edm"], help="ablation: time steps")
    g.add_argument("--schedule", choices=["vp", "ve", "linear"], help="ablation: sigma(t)")
    g.add_argument("--scaling", choices=["vp", "none"], help="ablation: s(t)")

    g = p.add_argument_group("guidance (chapter 10; default: none)")
    g.add_argument("--guidance", metavar="W", type=common.number(float, 0), default=1.0,
                   help="guidance weight w: D_w = D_guide + w (D_main - D_guide) (default: 1 = off)")
    g.add_argument("--guide-network", metavar="PATH", help="autoguidance: a weaker network of the same task (e.g. "
                   "an earlier snapshot); without it, classifier-free guidance on --network's own zero-class "
                   "output (needs a class-conditional network, best one trained with 07 --label-dropout)")
    g.add_argument("--guidance-interval", metavar="LO,HI", help="guide only for sigma in [LO, HI] (default: all sigma)")


def add_detector(p):
    p.add_argument("--detector", default="nvidia", help="nvidia (default; the paper's numbers), nvidia-pkl, "
                   "pytorch-fid, or a local .pt/.pth/.pkl file")
    p.add_argument("--batch", type=common.number(int, 1), default=64, help="maximum batch size per GPU (default: 64)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, fn, text):
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        p.set_defaults(run=fn)
        return p

    p = add("demo", demo, "Frechet distance on Gaussians with known FID (the default; a few seconds).")
    p.add_argument("--seed", type=common.number(int, 0), default=0, help="random seed (default: 0)")
    p.add_argument("--outdir", default=None, help="where the figure goes (default: out/08_evaluate_fid/)")
    add_device(p)

    p = add("generate", cmd_generate, "Generate {seed:06d}.png images (each depends on its seed only).")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-49999 or 0,5,7-9 (default: 0-63)")
    p.add_argument("--subdirs", action="store_true", help="one subfolder per 1000 seeds")
    p.add_argument("--outdir", default=None, help="where the PNGs, grid.png and generation.json go: a new or empty "
                   "folder, never overwritten (default: out/08_evaluate_fid/images/)")
    p.add_argument("--add", action="store_true", help="add to --outdir although it has images (of other seeds; "
                   "an image is never replaced); generation.json gets one more entry, grid.png is redrawn")
    add_network(p)
    add_sampler_options(p)
    add_device(p)

    p = add("ref", cmd_ref, "Reference statistics (mu, sigma) of a dataset, written to an .npz.")
    p.add_argument("--data", required=True, help="what 07 trained on: cifar10 (the training set), shapes (07's "
                   "built-in set, e.g. the default run's), or a folder/.zip of images")
    p.add_argument("--data-dir", default=None,
                   help="where cifar-10-python.tar.gz is looked for / downloaded (default: 07's out/data)")
    p.add_argument("--resolution", type=common.number(int, 4), default=None, help="as 07's: the size of the "
                   "shapes (default: 16, the default run's); for image data, a check")
    p.add_argument("--dest", required=True, help="output .npz")
    add_detector(p)
    add_device(p)

    p = add("calc", cmd_calc, "FID of a folder/.zip of images against reference statistics.")
    p.add_argument("--images", required=True, help="folder or .zip of images")
    p.add_argument("--ref", required=True, help="reference .npz (path or URL)")
    p.add_argument("-n", "--num", type=common.number(int, 2), default=50000,
                   help=f"images to use; error if fewer, seeded subset if more (default: 50000; {TORCHRUN_NUM})")
    p.add_argument("--seed", type=common.number(int, 0), default=0,
                   help="seed of the random subset when there are more than --num images (default: 0)")
    add_detector(p)
    add_device(p)

    p = add("fid", cmd_fid, "The paper's protocol: FID of --repeats seed sets of --num images each, and the minimum.")
    p.add_argument("--ref", required=True, help="reference .npz (path or URL)")
    p.add_argument("-n", "--num", type=common.number(int, 2), default=50000,
                   help=f"images per seed set (default: 50000; {TORCHRUN_NUM})")
    p.add_argument("--repeats", type=common.number(int, 1), default=3,
                   help="seed sets 0..num-1, num..2num-1, ... (default: 3)")
    p.add_argument("--outdir", default=None, help="where fid.json goes (default: out/08_evaluate_fid/)")
    p.add_argument("--detector", default="nvidia", help="nvidia (default; the paper's numbers), nvidia-pkl, "
                   "pytorch-fid, or a local .pt/.pth/.pkl file")
    add_network(p)
    add_sampler_options(p)
    add_device(p)

    p = add("nearest", cmd_nearest, "Memorisation check: each generated image's 2 nearest training images (L2 in "
            "pixel space); near-copy when d1 < d2 / 3 (Carlini et al. 2023). Writes nearest.png and nearest.json.")
    p.add_argument("--data", help="the training images: a folder/.zip (center-cropped and resized as 07 "
                   "--resolution does), cifar10 or shapes (07's built-in set) (required)")
    p.add_argument("--data-dir", default=None,
                   help="where cifar-10-python.tar.gz is looked for (default: 07's out/data)")
    p.add_argument("--images", help="a folder/.zip of images to check instead of generating with --network")
    p.add_argument("--seeds", default="0-63", help="with --network: the seeds to generate (default: 0-63)")
    p.add_argument("--rows", type=common.number(int, 1), default=16,
                   help="grid rows: the most copy-like images (default: 16)")
    p.add_argument("--outdir", default=None, help="where nearest.png/.json go "
                   "(default: out/08_evaluate_fid/nearest/)")
    p.add_argument("--network", help="an official .pkl or a 07 snapshot to generate --seeds with (04's "
                   "edm_sampler)")
    p.add_argument("--steps", dest="num_steps", metavar="N", type=common.number(int, 2), default=None,
                   help="with --network: sampling steps (default: 18)")
    p.add_argument("--batch", type=common.number(int, 1), default=64, help="generation batch size (default: 64)")
    add_device(p)
    return parser


def parse_args(argv=None):
    """Parse the command line; no subcommand (or only options) means the demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "demo")
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        common.run(args.run, args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
