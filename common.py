"""common.py -- the little that several chapters share, and no concept of its own.

* `load("04_stochastic_sampler")` imports a numbered script as a module, so a later
  chapter can reuse an earlier one (file names that start with a digit cannot be
  imported with a plain `import` statement).
* Seeding, and `StackedRandomGenerator`: one torch.Generator per seed, so that the
  latents and noise of each sample depend only on its own seed and never on which
  other seeds share its batch (the behaviour of the official generate.py).
* `to_uint8` quantizes as the official code does ((x * 127.5 + 128) clipped and truncated to
  uint8); `save_grid` draws titled, labelled sample grids.
* The one denoiser calling convention, `model(x, sigma, **extra_args)` (`denoise`), and
  `CountingDenoiser`, which measures NFE.
* The image reader 07 trains from and 08 measures FID on: `ImageFolder` (a folder or .zip;
  labels from dataset.json or class sub-folders) and `load_cifar10`.
* Device / precision selection, a shared argparse base (with range-checked numbers), a demo's
  start (`start`: seed, device, output folder `out/<script name>/`), files written atomically
  (`atomic_open`), one download cache (`download`), and torchrun: joining the process group,
  `rank0_first` (07 trains and 08 generates under torchrun).

Errors: library code raises (ValueError for bad values, FileNotFoundError/OSError for paths);
`run`, each script's `main()`, turns them into one `error: ...` line and exit 1.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import sys
import urllib.parse
import zipfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------
# Loading earlier chapters.

def load(name):
    """Import `<ROOT>/<name>.py` (e.g. "05_preconditioning") once, cached in sys.modules under its file
    name, so every chapter that loads it gets the same module object (and the same classes)."""
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(ROOT, name + ".py")
    if not os.path.isfile(path):
        raise ImportError(f"{name}.py is missing: copy it next to common.py ({ROOT}); "
                          f"the README's Copy table lists what each chapter needs")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ----------------------------------------------------------------------------
# Randomness.

def seed_all(seed):
    """Seed Python, NumPy and torch (CPU and every GPU) for a reproducible demo."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class StackedRandomGenerator:
    """A batch of independent generators, one per seed.

    `randn([B, ...])` draws row i from generator i only, so sample i is the same
    whether it is generated alone, in a batch of 8, or on another GPU. Pass
    `rnd.randn_like` to a sampler as its `randn_like`.
    """

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def _check(self, size):
        if size[0] != len(self.generators):
            raise ValueError(f"batch size {size[0]} does not match the {len(self.generators)} seeds")

    def randn(self, size, **kwargs):
        self._check(size)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        self._check(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])


# ----------------------------------------------------------------------------
# Denoisers: the one calling convention of every sampler, and counting their evaluations.
#
# Every denoiser -- exact ones, networks, guided ones -- is called as k-diffusion calls its models,
# `model(x, sigma, **extra_args)`; a class-conditional network gets extra_args = {"class_labels": labels}.

def denoise(model, x, sigma, extra_args=None):
    """D(x; sigma) = model(x, sigma, **extra_args) as float64, the precision samplers integrate in.

    A network with parameters gets x and sigma in its parameters' dtype (as the official EDMPrecond casts
    its inputs to float32), so a plain float32 nn.Module works; an exact denoiser gets them unchanged.
    """
    params = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if params is not None:
        x, sigma = x.to(params.dtype), torch.as_tensor(sigma, device=x.device).to(params.dtype)
    return model(x, sigma, **(extra_args or {})).to(torch.float64)


class CountingDenoiser:
    """Wraps a denoiser and counts the images that go through it: NFE is measured, never computed.

    `evaluations` sums the batch size of every call, so `per_image(n)` = evaluations / n is the NFE
    per image whatever the batch sizes. Attributes samplers read (sigma_min, round_sigma, label_dim,
    ...) are the wrapped denoiser's.
    """

    def __init__(self, model):
        self.model, self.evaluations = model, 0

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, x, sigma, **extra_args):
        self.evaluations += x.shape[0]
        return self.model(x, sigma, **extra_args)

    def per_image(self, images):
        n = self.evaluations / images
        return int(n) if n.is_integer() else n


def rms(a, b):
    """Root-mean-square distance between two batches (data units)."""
    return float(((a - b) ** 2).mean().sqrt())


# ----------------------------------------------------------------------------
# Images.

def to_uint8(x):
    """[N, C, H, W] float in [-1, 1] -> [N, H, W, C] uint8, as the official generate.py quantizes."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(x, path, title, row_labels=None, ncol=8, min_width=512, column_labels=None):
    """Save a batch [N, C, H, W] (float in [-1, 1], or uint8) as a titled grid of `ncol` columns (N divisible
    by ncol).

    Each pixel becomes an integer-sized block (nearest neighbour), so tiny images stay sharp and the
    grid is at least `min_width` pixels wide; `row_labels` name the rows (kimg, w, NFE, class...),
    `column_labels` the columns (above them; seeds, classes).
    """
    import torch.nn.functional as F
    from matplotlib.figure import Figure
    images = x.cpu() if x.dtype == torch.uint8 else to_uint8(x).permute(0, 3, 1, 2)
    images = F.pad(images, [1, 0, 1, 0], value=255)                # 1-pixel white gaps
    n, c, h, w = images.shape
    grid = images.reshape(n // ncol, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(n // ncol * h, ncol * w, c)
    inches = [size * int(np.ceil(min_width / (ncol * w))) / 100 for size in grid.shape[1::-1]]   # at 100 dpi
    left = max(1.2, 0.09 * max(map(len, row_labels))) if row_labels else 0.1   # room for the row labels
    top = 1.0 if column_labels else 0.5                               # room for the title (and column labels)
    fig = Figure(figsize=(inches[0] + left + 0.1, inches[1] + top), dpi=100)
    ax = fig.add_axes([left / fig.get_figwidth(), 0.05 / fig.get_figheight(),
                       inches[0] / fig.get_figwidth(), inches[1] / fig.get_figheight()])
    ax.imshow(grid.squeeze(2).numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / fig.get_figheight(), va="top")   # centred on the figure
    ax.set_xticks([(j + 0.5) * w for j in range(len(column_labels or []))], column_labels or [], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([(r + 0.5) * h for r in range(len(row_labels or []))], row_labels or [])
    ax.tick_params(length=0, labelsize=10)
    fig.savefig(path)


# ----------------------------------------------------------------------------
# Devices, precision, command lines, output folders.

def get_device(name="auto"):
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    return device


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_dtype(precision):
    """'fp32' | 'bf16' | 'fp16' -> torch dtype."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def number(kind=int, low=None, high=None):
    """An argparse `type` that parses `kind` and requires low <= value <= high (None: unbounded).

    `--batch -4` then fails with one line ("argument --batch: must be >= 1, got -4") instead of
    failing deep inside the program.
    """
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if low is not None and high is not None else \
                f">= {low}" if low is not None else f"<= {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def base_parser(doc, seed=0):
    """An ArgumentParser with the options every chapter's demo shares (no abbreviated flags)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--outdir", default=None, help="where figures go (default: out/<script name>/)")
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
    return parser


def run(demo, args):
    """A chapter's `main()`: run `demo(args)`; a ValueError or OSError -- or an ImportError, such as `load`'s
    for a chapter file that is not there -- becomes one `error:` line, exit 1."""
    try:
        demo(args)
    except (ValueError, OSError, ImportError) as error:
        sys.exit(f"error: {error}")


def start(script_file, args):
    """A demo's first line: seed every RNG with --seed; return its device and its output folder (created)."""
    seed_all(args.seed)
    return get_device(args.device), out_dir(script_file, args.outdir)


def out_dir(script_file, outdir=None):
    """Create and return the output folder: `outdir`, or out/<script name>/ under the working directory."""
    path = outdir or os.path.join("out", os.path.splitext(os.path.basename(script_file))[0])
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):   # the path, or a folder above it, is a file: say so in words
        raise NotADirectoryError(f"--outdir {path} is (or lies inside) a file, not a folder; pass a folder") from None
    return path


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """`with atomic_open(path) as f:` writes a temporary file that replaces `path` only once complete, so a
    reader (or a crash) never sees half a file; after an error the temporary file is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)


def download(url, what):
    """Path of `url`'s file in the one download cache (torch.hub's: ~/.cache/torch/hub/checkpoints, or under
    $TORCH_HOME), downloaded on first use; `what` names it in the error when that fails."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, progress=get_rank() == 0)
        except OSError as e:  # urllib's URLError is an OSError
            raise OSError(f"cannot download {what} from {url} ({e}); "
                          f"download it elsewhere and put it at {path} (or pass its path)") from None
    return path


# ----------------------------------------------------------------------------
# Image sets: a uint8 tensor [N, C, H, W] and integer class labels (or none), for 07 and 08 alike.

DATA_DIR = os.path.join("out", "data")       # where CIFAR-10's tarball is looked for (07 and 08)
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


def load_cifar10(data_dir=DATA_DIR):
    """The 50,000 CIFAR-10 training images (uint8 [50000, 3, 32, 32]) and classes (int64 [50000])."""
    import torchvision
    try:
        dataset = torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True)
    except Exception as error:   # offline: urllib/socket/integrity errors all end here
        raise OSError(f"CIFAR-10 is not in {data_dir!r} and could not be downloaded ({type(error).__name__}); "
                      f"put cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
                      f"into {data_dir!r}") from None
    return torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous(), np.asarray(dataset.targets, np.int64)


# ----------------------------------------------------------------------------
# torchrun: plain `python` is one process; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK.

def init_distributed(device_name="auto"):
    """Join torchrun's process group if there is one. Returns (rank, world_size, device).

    NCCL on GPUs, gloo on CPUs; each process takes the GPU numbered by its LOCAL_RANK, and tells NCCL so
    (device_id): without it NCCL's first collective guesses the GPU from the global rank, the wrong one on a
    second node or with fewer processes than GPUs. Under torchrun the group is joined even with one
    process, so `--nproc_per_node=1` tests that path.
    """
    if "RANK" not in os.environ:
        return 0, 1, get_device(device_name)
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         device_id=device if device.type == "cuda" else None)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank0_first(fn, *args):
    """fn(*args) on each node's first process (LOCAL_RANK 0) first -- it downloads into the cache the node
    shares -- then on that node's other processes, which wait at a barrier until it is done."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        torch.distributed.barrier()
    result = fn(*args)
    if first and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def gather(obj):
    """Every rank's `obj` (any picklable value), in rank order; just [obj] without torchrun."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
