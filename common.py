"""common.py -- the little that several chapters share, and no concept of its own.

* `load("04_stochastic_sampler")` imports a numbered script as a module, so a later
  chapter can reuse an earlier one (file names that start with a digit cannot be
  imported with a plain `import` statement).
* Seeding, and `StackedRandomGenerator`: one torch.Generator per seed, so that the
  latents and noise of each sample depend only on its own seed and never on which
  other seeds share its batch (the behaviour of the official generate.py).
* `to_uint8` quantizes as the official code does ((x * 127.5 + 128) clipped and truncated to
  uint8); `save_grid` draws titled, labelled sample grids.
* Device / precision selection, a shared argparse base (with range-checked numbers), a demo's
  start (`start`: seed, device, output folder `out/<script name>/`), atomic JSON files, and
  joining a torchrun process group (07 trains and 08 generates under torchrun).

Errors: library code raises (ValueError for bad values, FileNotFoundError/OSError for paths);
`run`, each script's `main()`, turns them into one `error: ...` line and exit 1.
"""

import argparse
import importlib.util
import json
import os
import random
import sys

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


# ----------------------------------------------------------------------------
# Images.

def to_uint8(x):
    """[N, C, H, W] float in [-1, 1] -> [N, H, W, C] uint8, as the official generate.py quantizes."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(x, path, title, row_labels=None, ncol=8, min_width=512):
    """Save a batch [N, C, H, W] in [-1, 1] as a titled grid of `ncol` columns (N divisible by ncol).

    Each pixel becomes an integer-sized block (nearest neighbour), so tiny images stay sharp and the
    grid is at least `min_width` pixels wide; `row_labels` name the rows (kimg, w, NFE, class...).
    """
    import torch.nn.functional as F
    from matplotlib.figure import Figure
    images = F.pad(to_uint8(x).permute(0, 3, 1, 2), [1, 0, 1, 0], value=255)   # 1-pixel white gaps
    n, c, h, w = images.shape
    grid = images.reshape(n // ncol, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(n // ncol * h, ncol * w, c)
    inches = [size * int(np.ceil(min_width / (ncol * w))) / 100 for size in grid.shape[1::-1]]   # at 100 dpi
    left = 1.2 if row_labels else 0.1                                # room for the row labels
    fig = Figure(figsize=(inches[0] + left + 0.1, inches[1] + 0.5), dpi=100)
    ax = fig.add_axes([left / fig.get_figwidth(), 0.05 / fig.get_figheight(),
                       inches[0] / fig.get_figwidth(), inches[1] / fig.get_figheight()])
    ax.imshow(grid.squeeze(2).numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
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
    """A chapter's `main()`: run `demo(args)`; a ValueError or OSError becomes one `error:` line, exit 1."""
    try:
        demo(args)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")


def start(script_file, args):
    """A demo's first line: seed every RNG with --seed; return its device and its output folder (created)."""
    seed_all(args.seed)
    return get_device(args.device), out_dir(script_file, args.outdir)


def out_dir(script_file, outdir=None):
    """Create and return the output folder: `outdir`, or out/<script name>/ under the working directory."""
    path = outdir or os.path.join("out", os.path.splitext(os.path.basename(script_file))[0])
    os.makedirs(path, exist_ok=True)
    return path


def write_json(obj, path):
    """Write `obj` as JSON atomically (temp file + rename): a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# torchrun: plain `python` is one process; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK.

def init_distributed(device_name="auto"):
    """Join torchrun's process group if there is one. Returns (rank, world_size, device).

    NCCL on GPUs, gloo on CPUs; each process takes the GPU numbered by its LOCAL_RANK. Under
    torchrun the group is joined even with one process, so `--nproc_per_node=1` tests that path.
    """
    if "RANK" not in os.environ:
        return 0, 1, get_device(device_name)
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def gather(obj):
    """Every rank's `obj` (any picklable value), in rank order; just [obj] without torchrun."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
