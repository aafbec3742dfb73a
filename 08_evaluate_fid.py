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

Subcommands (each has --help):

  generate  PNGs named {seed:06d}.png with the EDM sampler (Algorithm 2) or the
            ablation sampler of chapter 03; works under torchrun.
  ref       reference statistics (mu, sigma) of a dataset -> .npz
  calc      FID of a folder/zip of images against a reference .npz
  fid       the whole protocol in one command: generate straight into statistics
            (the same images `generate` would write), three seed sets, JSON result
  demo      (default) Frechet distance on Gaussians with known FID: how the estimate
            is biased by the number of images, and why the paper uses 50k and min-of-3.

Examples:

  python 08_evaluate_fid.py                                     # the demo, a few seconds
  torchrun --standalone --nproc_per_node=8 08_evaluate_fid.py fid \\
      --network edm-cifar10-32x32-cond-vp.pkl \\
      --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
"""

import io
import json
import os
import pickle
import re
import sys
import time
import urllib.error
import urllib.parse
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
import tqdm
from torchvision.models import inception as tv_inception

import common

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
            raise SystemExit(f"error: need at least 2 images for a covariance, got {int(n)}")
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# ----------------------------------------------------------------------------
# 3. The feature detector: Inception-v3 pool features (2048-d) as FID defines them.
#
# Two published ports of the TF graph `inception-2015-12-05` (2015) exist:
#   * NVIDIA's TorchScript port, used by the official EDM/StyleGAN fid code. It takes
#     uint8 NCHW images of any size and resizes them to 299x299 itself. Numbers made with it
#     are comparable with the paper. The official fid.py downloads it as a pickle
#     ("nvidia-pkl"); NVIDIA published the same port earlier as a TorchScript
#     archive (.pt, used by StyleGAN2-ADA's metrics and by clean-fid), which is what we
#     download: torch.jit.load reads it without unpickling arbitrary Python objects.
#   * pytorch-fid's state dict for torchvision's inception_v3. TF's graph differs from
#     torchvision's in its pooling (average pools ignore the padding; the last block
#     max-pools) and has 1008 classes; patched below. Its bilinear resize to 299 differs
#     slightly from TF's, so its FIDs are close to, but not exactly, the paper's.

DETECTORS = {
    "nvidia": "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    # The pickle the official fid.py loads; usable only if it embeds a TorchScript archive (see below).
    "nvidia-pkl": "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl",
    "pytorch-fid": "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
}
FEATURE_DIM = 2048


def cache_dir():
    """Downloads go where torch.hub keeps checkpoints (~/.cache/torch/hub/checkpoints, or $TORCH_HOME)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def fetch(url, what):
    """Path of a URL's file in the cache, downloading it on first use; offline -> one clear line."""
    path = os.path.join(cache_dir(), os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, progress=get_rank() == 0)
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"error: cannot download {what} from {url} ({e}); "
                             f"download it elsewhere and put it at {path} (or pass its path)")
    return path


def _tf_pool(x, use_max=False):
    # TF's 3x3 average pool ignores the zero padding when averaging (count_include_pad=False);
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
    """pytorch-fid's weights in torchvision's Inception: uint8 NCHW -> [N, 2048] pool features."""
    feature_dim = FEATURE_DIM

    def __init__(self, state_dict):
        super().__init__()
        self.net = tf_inception_v3()
        self.net.load_state_dict(state_dict)
        self.net.fc = torch.nn.Identity()  # stop at the 2048-d average pool
        self.eval()

    def forward(self, images):
        x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1)  # the graph expects [-1, 1]


class NvidiaDetector(torch.nn.Module):
    """NVIDIA's TorchScript Inception: uint8 NCHW at any resolution -> [N, 2048] pool features."""
    feature_dim = FEATURE_DIM

    def __init__(self, script_module):
        super().__init__()
        self.net = script_module.eval()

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
        raise SystemExit(f"error: {path} holds no TorchScript network that can be read without executing code "
                         f"stored in the pickle; use the TorchScript file {DETECTORS['nvidia']} instead")
    return load_torchscript(io.BytesIO(found[0]))


def open_detector_file(path):
    """A detector from a local file: TorchScript (.pt), pytorch-fid state dict (.pth) or NVIDIA's .pkl."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: detector file not found: {path}")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # TorchScript archives and new-style torch.save files are zips
        if is_zip and any("/code/" in n for n in zipfile.ZipFile(path).namelist()):
            return NvidiaDetector(load_torchscript(path))
        if path.endswith(".pkl"):
            return NvidiaDetector(_torchscript_in_pickle(path))
        return TorchvisionDetector(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot read detector {path}: {str(e).splitlines()[0]}")


def load_detector(spec, device):
    """`nvidia` (default, the paper's), `nvidia-pkl`, `pytorch-fid`, or a local file path."""
    if spec in DETECTORS:
        path = fetch(DETECTORS[spec], f"the Inception detector ({spec})")
    else:
        path = spec
    return open_detector_file(path).to(device)


def features_of(detector, images):
    """[N, C, H, W] uint8 on the detector's device -> [N, D] features (grey images become RGB)."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return detector(images)


# ----------------------------------------------------------------------------
# 4. Reading images: a folder or zip of images (the official dataset-tool layout,
# searched recursively, in sorted order), and CIFAR-10 through torchvision.

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageFiles:
    """The images of a folder or .zip as uint8 CHW arrays; all must share one shape."""

    def __init__(self, path):
        self.path = path
        if os.path.isdir(path):
            names = [os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files]
            self.zip = None
        elif path.lower().endswith(".zip") and os.path.isfile(path):
            self.zip = zipfile.ZipFile(path)
            names = self.zip.namelist()
        else:
            raise SystemExit(f"error: {path} is neither a folder nor a .zip of images")
        self.names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        self.shape = None
        self.shape = self.read(0).shape if self.names else None  # every later image must match the first

    def __len__(self):
        return len(self.names)

    def read(self, i):
        import PIL.Image
        name = self.names[i]
        with (self.zip.open(name) if self.zip else open(os.path.join(self.path, name), "rb")) as f:
            image = PIL.Image.open(f)
            if image.mode not in ("L", "RGB"):
                raise SystemExit(f"error: {name} has mode {image.mode}; FID needs greyscale or RGB images")
            array = np.array(image)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if self.shape is not None and array.shape != self.shape:
            raise SystemExit(f"error: {name} is {array.shape[1]}x{array.shape[2]} with {array.shape[0]} channel(s), "
                             f"but the first image is {self.shape[1]}x{self.shape[2]} with {self.shape[0]}")
        return array

    def batch(self, indices):
        return torch.from_numpy(np.stack([self.read(int(i)) for i in indices]))


class ArrayImages:
    """An in-memory uint8 NHWC array (e.g. CIFAR-10's 50,000 training images) with the ImageFiles interface."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def batch(self, indices):
        return torch.from_numpy(self.array[np.asarray(indices)]).permute(0, 3, 1, 2)


def cifar10_train(data_dir):
    import torchvision
    try:
        return ArrayImages(torchvision.datasets.CIFAR10(data_dir, train=True, download=True).data)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: cannot download CIFAR-10 ({e}); put cifar-10-python.tar.gz from "
                         f"https://www.cs.toronto.edu/~kriz/cifar.html into {data_dir}")


def open_images(spec, data_dir):
    return cifar10_train(data_dir) if spec == "cifar10" else ImageFiles(spec)


def random_subset(n_total, num, seed):
    """The official rule: all images if there are exactly `num`, else a seeded random subset, sorted."""
    idx = np.arange(n_total)
    if n_total > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx


# ----------------------------------------------------------------------------
# 5. Distributed helpers: plain `python` is one rank; `torchrun` sets WORLD_SIZE.

def init_distributed(device_name):
    """Join the torchrun group if there is one; returns this rank's device."""
    device = common.get_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def print0(*args):
    if get_rank() == 0:
        print(*args, flush=True)


def rank_batches(items, batch_size):
    """Split items into batches of at most batch_size, dealt round-robin to the ranks (as the official code).

    Every rank gets the same number of batches (some possibly empty), so collective calls line up.
    """
    world = get_world_size()
    num_batches = ((len(items) - 1) // (batch_size * world) + 1) * world
    return torch.as_tensor(items).tensor_split(num_batches)[get_rank()::world]


def rank0_first(fn, *args):
    """Run fn on rank 0 first (it downloads into the cache), then on the others."""
    if get_rank() != 0:
        torch.distributed.barrier()
    result = fn(*args)
    if get_rank() == 0 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


# ----------------------------------------------------------------------------
# 6. Generating images, each a function of its seed only.

def parse_seeds(text):
    """'0-49999' or '0,5,7-9' -> a list of ints (ranges inclusive, as the official code)."""
    seeds = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise SystemExit(f"error: bad seed list {text!r}; use e.g. 0-49999 or 0,5,7-9")
        seeds += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return seeds


ABLATION_OPTIONS = ("solver", "discretization", "schedule", "scaling")


def sampler_settings(args):
    """The sampler options given on the command line (None = the sampler's default)."""
    names = ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise") + ABLATION_OPTIONS
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def nfe(settings):
    """Network evaluations per image: Heun spends 2 per step except the last (Sec. 3), Euler 1."""
    steps = settings.get("num_steps", 18)
    return steps if settings.get("solver") == "euler" else 2 * steps - 1


def generate_batch(net, seeds, device, class_idx=None, **sampler_kwargs):
    """uint8 images [N, C, H, W] for the given seeds, each depending on its own seed only.

    As in the official generate.py, each seed's generator first draws the latents, then
    (for a conditional network) the class label, then the sampler's churn noise.
    """
    rnd = common.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            class_labels = torch.zeros_like(class_labels)
            class_labels[:, class_idx] = 1
    if any(k in sampler_kwargs for k in ABLATION_OPTIONS):
        sampler = common.load("03_heun_and_schedules").ablation_sampler
    else:
        sampler = common.load("04_stochastic_sampler").edm_sampler
    with torch.no_grad():
        x = sampler(net, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return common.to_uint8(x).permute(0, 3, 1, 2)


def load_net(path, device):
    """A network from 06's load_network (official pickles or this project's snapshots); errors in one line."""
    if not re.match(r"https?://", path) and not os.path.isfile(path):
        raise SystemExit(f"error: network file not found: {path}")
    try:
        net = common.load("06_unet").load_network(path)  # also downloads official URLs into a cache
    except SystemExit:
        raise
    except Exception as e:  # a corrupt or foreign file can fail in many ways; say which file and why
        raise SystemExit(f"error: cannot load network {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return net.eval().requires_grad_(False).to(device)


def png_path(outdir, seed, subdirs):
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


def generate_pngs(net, seeds, outdir, batch_size, device, subdirs=False, class_idx=None, **sampler_kwargs):
    """Write {seed:06d}.png for this rank's share of the seeds."""
    for batch_seeds in tqdm.tqdm(rank_batches(seeds, batch_size), unit="batch", disable=get_rank() != 0):
        if len(batch_seeds) == 0:
            continue
        images = generate_batch(net, batch_seeds.tolist(), device, class_idx, **sampler_kwargs)
        for seed, image in zip(batch_seeds.tolist(), images.permute(0, 2, 3, 1)):
            path = png_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            common.save_png(image, path)


# ----------------------------------------------------------------------------
# 7. Statistics of generated images (no PNGs written) and of image sets.

def generated_stats(net, seeds, detector, batch_size, device, class_idx=None, **sampler_kwargs):
    """(mu, sigma) of the detector features of the images `generate` would write for these seeds."""
    stats = FeatureStats(detector.feature_dim, device)
    for batch_seeds in tqdm.tqdm(rank_batches(seeds, batch_size), unit="batch", disable=get_rank() != 0):
        if len(batch_seeds):
            images = generate_batch(net, batch_seeds.tolist(), device, class_idx, **sampler_kwargs)
            stats.update(features_of(detector, images.to(device)))
    stats.all_reduce()
    return stats.mean_cov()


def image_stats(images, indices, detector, batch_size, device):
    """(mu, sigma) of the detector features of images[indices], split across ranks."""
    stats = FeatureStats(detector.feature_dim, device)
    for batch in tqdm.tqdm(rank_batches(indices, batch_size), unit="batch", disable=get_rank() != 0):
        if len(batch):
            stats.update(features_of(detector, images.batch(batch).to(device)))
    stats.all_reduce()
    return stats.mean_cov()


def load_ref(spec, feature_dim):
    """Reference statistics from an .npz path or URL (e.g. the official fid-refs), checked."""
    path = fetch(spec, "the reference statistics") if re.match(r"https?://", spec) else spec
    if not os.path.isfile(path):
        raise SystemExit(f"error: reference statistics not found: {path}")
    try:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise SystemExit(f"error: {path} is not a reference .npz with arrays 'mu' and 'sigma' ({e})")
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise SystemExit(f"error: reference {path} has {mu.shape[0]}-d statistics but the detector gives "
                         f"{feature_dim}-d features; it was made with a different detector")
    return mu, sigma


def write_json(obj, path):
    """Atomic write: a reader never sees a half-written result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# 8. Subcommands.

def cmd_generate(args):
    device = init_distributed(args.device)
    seeds = parse_seeds(args.seeds)
    net = rank0_first(load_net, args.network, device)
    check_class(net, args.class_idx)
    outdir = common.out_dir(__file__, args.outdir)
    print0(f"Generating {len(seeds)} images into {outdir} ({nfe(sampler_settings(args))} NFE per image)...")
    generate_pngs(net, seeds, outdir, args.batch, device, args.subdirs, args.class_idx, **sampler_settings(args))
    print0("Done.")


def cmd_ref(args):
    device = init_distributed(args.device)
    images = rank0_first(open_images, args.data, args.data_dir)  # rank 0 downloads CIFAR-10 alone
    if len(images) < 2:
        raise SystemExit(f"error: found {len(images)} images in {args.data}; need at least 2")
    detector = rank0_first(load_detector, args.detector, device)
    print0(f"Computing statistics of {len(images)} images from {args.data}...")
    mu, sigma = image_stats(images, np.arange(len(images)), detector, args.batch, device)
    if get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.dest)), exist_ok=True)
        tmp = args.dest + ".tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, args.dest)
        print(f"Saved reference statistics to {args.dest}")


def cmd_calc(args):
    device = init_distributed(args.device)
    images = ImageFiles(args.images)
    if len(images) < args.num:
        raise SystemExit(f"error: found {len(images)} images in {args.images}, but --num is {args.num}")
    detector = rank0_first(load_detector, args.detector, device)
    ref = load_ref(args.ref, detector.feature_dim)
    print0(f"Computing statistics of {args.num} of the {len(images)} images in {args.images}...")
    mu, sigma = image_stats(images, random_subset(len(images), args.num, args.seed), detector, args.batch, device)
    if get_rank() == 0:
        print(f"FID {frechet_distance(mu, sigma, *ref):g}")


def cmd_fid(args):
    device = init_distributed(args.device)
    net = rank0_first(load_net, args.network, device)
    check_class(net, args.class_idx)
    detector = rank0_first(load_detector, args.detector, device)
    ref = load_ref(args.ref, detector.feature_dim)
    settings = sampler_settings(args)
    start, result = time.time(), {"fid": [], "seeds": []}
    for k in range(args.repeats):
        seeds = list(range(k * args.num, (k + 1) * args.num))
        print0(f"Seeds {seeds[0]}-{seeds[-1]}: generating {args.num} images into statistics ({nfe(settings)} NFE each)...")
        mu, sigma = generated_stats(net, seeds, detector, args.batch, device, args.class_idx, **settings)
        result["fid"].append(frechet_distance(mu, sigma, *ref))
        result["seeds"].append(f"{seeds[0]}-{seeds[-1]}")
        print0(f"  FID {result['fid'][-1]:g}")
    sampler = "ablation_sampler" if any(k in settings for k in ABLATION_OPTIONS) else "edm_sampler"
    result.update(fid_min=min(result["fid"]), nfe=nfe(settings), class_idx=args.class_idx,
                  sampler={"function": sampler, "options": settings},  # options not listed: the function's defaults
                  num_images=args.num, network=os.path.abspath(args.network), ref=args.ref, detector=args.detector,
                  gpus=get_world_size(), seconds=round(time.time() - start, 1))
    if get_rank() == 0:
        path = os.path.join(common.out_dir(__file__, args.outdir), "fid.json")
        write_json(result, path)
        print(f"FID min of {args.repeats}: {result['fid_min']:g}   (result in {path})")


def check_class(net, class_idx):
    if class_idx is not None and not (net.label_dim and 0 <= class_idx < net.label_dim):
        raise SystemExit(f"error: --class {class_idx} but the network has {net.label_dim} classes")


# ----------------------------------------------------------------------------
# 9. The demo: Frechet distance on Gaussian "features" whose true FID is known.
#
# FID is estimated from n images, and the estimate is biased upward (even two sets
# drawn from the same distribution give FID > 0) by roughly tr(S)/n-sized terms. That
# is why FIDs are only comparable at the same n (50k) and why the paper repeats the
# measurement with three seed sets and reports the minimum.

def demo(args):
    import matplotlib.pyplot as plt
    common.seed_all(args.seed)
    outdir = common.out_dir(__file__, args.outdir)
    d = 64
    g = torch.Generator().manual_seed(args.seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # a shared eigenbasis
    lam = torch.linspace(0.1, 2.0, d, dtype=torch.float64) ** 2                 # real-image covariance spectrum
    mu_shift = torch.full([d], 0.05, dtype=torch.float64)
    sigma_r = q @ torch.diag(lam) @ q.T
    sigma_g = q @ torch.diag(lam * 1.1) @ q.T                                    # generator: 10% too much variance
    true_fid = float(mu_shift.square().sum() + (lam.sqrt() - (1.1 * lam).sqrt()).square().sum())
    print(f"{d}-d Gaussian features; closed-form FID(generator, real) = {true_fid:.5f}")

    def sample_stats(cov, mean, n):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ psd_factor(cov).T + mean
        s = FeatureStats(d)
        s.update(x)
        return s.mean_cov()

    ns = [500, 1000, 2000, 5000, 10000, 20000, 50000]
    rows = []
    print(f"{'n':>6} {'FID(real vs real)':>18} {'FID(gen vs real) x3':>28} {'min':>8}")
    for n in ns:
        # Against the exact real statistics, so all of the bias comes from the n generated samples.
        same = frechet_distance(*sample_stats(sigma_r, 0, n), np.zeros(d), sigma_r)
        three = [frechet_distance(*sample_stats(sigma_g, mu_shift, n), np.zeros(d), sigma_r) for _ in range(3)]
        rows.append((n, same, three))
        print(f"{n:6d} {same:18.5f} {' '.join(f'{v:8.5f}' for v in three):>28} {min(three):8.5f}")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(ns, [r[1] for r in rows], "o-", label="same distribution (true FID 0)")
    for i in range(3):
        ax.loglog(ns, [r[2][i] for r in rows], ".", color="C1", label="generator, 3 seed sets" if i == 0 else None)
    ax.axhline(true_fid, color="C1", ls="--", label=f"generator, true FID {true_fid:.3f}")
    ax.set_xlabel("number of images n")
    ax.set_ylabel("FID estimate")
    ax.set_title("FID is biased by finite n: compare only at n = 50k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(outdir, "fid_vs_n.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------
# Command line.

def build_parser():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = common.base_parser(__doc__)

    def add(name, help_text, fn):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[shared], conflict_handler="resolve")
        p.set_defaults(fn=fn)
        return p

    def sampler_options(p):
        p.add_argument("--network", required=True, help="an official .pkl (path or URL) or a snapshot of this project")
        p.add_argument("--class", dest="class_idx", type=int, default=None, help="class label (default: random per seed)")
        p.add_argument("--batch", type=int, default=64, help="maximum batch size per GPU (default: 64)")
        p.add_argument("--steps", dest="num_steps", type=int, default=None, help="sampling steps N (default: 18)")
        for name in ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise"):
            p.add_argument(f"--{name}", type=float, default=None, help="Algorithm 2 / ablation sampler option")
        p.add_argument("--solver", choices=["euler", "heun"], help="ablation: ODE solver (chapter 03)")
        p.add_argument("--disc", dest="discretization", choices=["vp", "ve", "iddpm", "edm"], help="ablation: time steps")
        p.add_argument("--schedule", choices=["vp", "ve", "linear"], help="ablation: sigma(t)")
        p.add_argument("--scaling", choices=["vp", "none"], help="ablation: s(t)")

    def detector_option(p):
        p.add_argument("--detector", default="nvidia",
                       help="nvidia (default; the paper's numbers), nvidia-pkl, pytorch-fid, or a local .pt/.pth/.pkl file")
        p.add_argument("--batch", type=int, default=64, help="maximum batch size per GPU (default: 64)")

    p = add("generate", "Generate {seed:06d}.png images (the images depend on the seeds only).", cmd_generate)
    sampler_options(p)
    p.add_argument("--seeds", default="0-63", help="e.g. 0-49999 or 0,5,7-9 (default: 0-63)")
    p.add_argument("--subdirs", action="store_true", help="one subfolder per 1000 seeds")
    p.add_argument("--outdir", default=None, help="where the PNGs go (default: out/08_evaluate_fid/)")

    p = add("ref", "Reference statistics (mu, sigma) of a dataset.", cmd_ref)
    p.add_argument("--data", required=True, help="cifar10 (training set via torchvision), or a folder/.zip of images")
    p.add_argument("--data-dir", default="data", help="where torchvision keeps CIFAR-10 (default: data)")
    p.add_argument("--dest", required=True, help="output .npz")
    detector_option(p)

    p = add("calc", "FID of a folder/.zip of images against reference statistics.", cmd_calc)
    p.add_argument("--images", required=True, help="folder or .zip of images")
    p.add_argument("--ref", required=True, help="reference .npz (path or URL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset when there are more than --num images")
    p.add_argument("-n", "--num", type=int, default=50000, help="images to use; error if fewer, seeded subset if more "
                   "(default: 50000; under torchrun write -n, as torchrun mistakes --num for its --numa-binding)")
    detector_option(p)

    p = add("fid", "The paper's protocol: FID of --repeats seed sets of --num images each, and the minimum.", cmd_fid)
    sampler_options(p)
    p.add_argument("--ref", required=True, help="reference .npz (path or URL)")
    p.add_argument("-n", "--num", type=int, default=50000, help="images per seed set (default: 50000; under "
                   "torchrun write -n, as torchrun mistakes --num for its --numa-binding)")
    p.add_argument("--repeats", type=int, default=3, help="seed sets 0..num-1, num..2num-1, ... (default: 3)")
    p.add_argument("--outdir", default=None, help="where fid.json goes (default: out/08_evaluate_fid/)")
    p.add_argument("--detector", default="nvidia",
                   help="nvidia (default; the paper's numbers), nvidia-pkl, pytorch-fid, or a local .pt/.pth/.pkl file")

    add("demo", "Frechet distance on Gaussians with known FID (the default).", demo)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv if argv else ["demo"])
    for name, flag, least in [("batch", "--batch", 1), ("num", "--num", 2), ("repeats", "--repeats", 1), ("num_steps", "--steps", 1)]:
        if getattr(args, name, None) is not None and getattr(args, name) < least:
            raise SystemExit(f"error: {flag} must be at least {least}")
    args.fn(args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
