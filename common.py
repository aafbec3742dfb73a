"""common.py -- the little that several chapters' concepts share: loading a chapter, per-seed generators, the
samplers' conventions (the denoiser call, NFE counting, Eq. 5 on a network's range, iDDPM's noise levels), the
official uint8 quantisation, running a chapter (options, output folder, one `error:` line for what library code
raises), atomic files, one download cache, and torchrun.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import sys
import urllib.parse

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def load(name):
    """Import `<ROOT>/<name>.py` (e.g. "05_preconditioning") once, as sys.modules[name]."""
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(ROOT, name + ".py")
    if not os.path.isfile(path):
        raise ImportError(f"{name}.py is missing: copy it next to common.py ({ROOT}); "
                          f"the README's Copy table lists what each chapter needs")
    spec = importlib.util.spec_from_file_location(name, path)
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]            # no half-imported chapter stays behind
        raise
    return module


class StackedRandomGenerator:
    """One generator per seed: row i of `randn([B, ...])` comes from generator i only, so sample i is the same alone,
    in a batch of 8 or on another GPU (the official generate.py). Pass `rnd.randn_like` to a sampler."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, **kwargs):
        return self.stack(torch.randn, size, **kwargs)

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, high, size, **kwargs):
        return self.stack(lambda *shape, **kw: torch.randint(high, shape, **kw), size, **kwargs)

    def stack(self, draw, size, **kwargs):
        if size[0] != len(self.generators):
            raise ValueError(f"batch size {size[0]} does not match the {len(self.generators)} seeds")
        return torch.stack([draw(*size[1:], generator=g, **kwargs) for g in self.generators])


# ----------------------------------------------------------------------------
# The samplers' conventions (k-diffusion's): sample_x(model, x, sigmas, extra_args=None, ...) integrates from the
# noisy images x at sigmas[0] through every sigmas[i] down to sigmas[-1] = 0 (unit latents z start as
# x = z * sigmas[0]), calling the denoiser as model(x, sigma, **extra_args) with a 0-d sigma.

def denoise(model, x, sigma, extra_args=None):
    """D(x; sigma) = model(x, sigma, **extra_args) as float64, the precision samplers integrate in. A network with
    parameters gets x and sigma in its parameters' dtype (as the official EDMPrecond casts its inputs)."""
    params = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if params is not None:
        x, sigma = x.to(params.dtype), torch.as_tensor(sigma, device=x.device).to(params.dtype)
    return model(x, sigma, **(extra_args or {})).to(torch.float64)


class CountingDenoiser:
    """A denoiser that counts the images it is called on: NFE is measured, never computed. per_image(n) =
    evaluations / n; the attributes samplers read (sigma_min, round_sigma, ...) are the wrapped model's."""

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


def noise_range(net, sigma_min, sigma_max):
    """[sigma_min, sigma_max] clamped to the noise levels `net` supports (its sigma_min / sigma_max, if any)."""
    return max(sigma_min, getattr(net, "sigma_min", 0)), min(sigma_max, getattr(net, "sigma_max", math.inf))


def with_zero(sigmas, net=None):
    """The noise levels, each rounded to one `net` has (its round_sigma: iDDPM's table), then sigma_N = 0."""
    if hasattr(net, "round_sigma"):
        sigmas = torch.as_tensor(net.round_sigma(sigmas), dtype=torch.float64)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80, rho=7, net=None):
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N, then
    sigma_N = 0 (float64). Uniform in sigma^(1/rho): rho = 1 is uniform in sigma, rho -> inf geometric; rho = 7
    spends its steps at low noise (chapter 03). With `net`, on the range it supports, rounded as it needs."""
    sigma_min, sigma_max = noise_range(net, sigma_min, sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return with_zero(sigmas, net)


def iddpm_noise_levels(M=1000, C_1=0.001, C_2=0.008, dtype=torch.float64):
    """iDDPM's noise levels u_0 > ... > u_M = 0 (Table 1): u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar_{j-1} /
    alpha_bar_j, C_1) - 1), alpha_bar_j = sin^2(pi/2 j / (M (C_2 + 1))). alpha_bar is float32 (the official code
    evaluates it on integer tensors); u is float64 in the official sampler (03), float32 in its network (05)."""
    j = torch.arange(M + 1)
    alpha_bar = torch.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)                        # alpha_bar(j-1) / alpha_bar(j)
    u = torch.zeros(M + 1, dtype=dtype)
    for k in range(M, 0, -1):     # (torch's sqrt, not math.sqrt: they differ in the last bit now and then)
        u[k - 1] = ((u[k] * u[k] + 1) / ratio[k - 1] - 1).sqrt()
    return u


def rms(a, b):
    """Root-mean-square distance between two batches (data units)."""
    return float(((a - b) ** 2).mean().sqrt())


def to_uint8(x):
    """[N, C, H, W] float in [-1, 1] -> [N, H, W, C] uint8, as the official generate.py quantizes."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ----------------------------------------------------------------------------
# Running a chapter: devices, options, output folders, the one error exit, files.

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def number(kind=int, low=None, high=None):
    """An argparse `type`: `kind` within [low, high] (None: open), so `--batch -4` fails in one line."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            bounds = (f">= {low}" if low is not None else "a number") if high is None else \
                f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def number_list(kind=float, low=None, high=None, ranges=False, empty=False):
    """An argparse `type` for 'a,b,c', each item checked as `number` checks it ('' is the empty list only where
    `empty`); with `ranges`, 'a-b' is a, a + 1, ..., b (seed lists '0-49999', '0,5,7-9', as the official code)."""
    one = number(kind, low, high)

    def parse(text):
        values = []
        for part in [p.strip() for p in text.split(",")] if text.strip() or not empty else []:
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part) if ranges else None
            if m and int(m[2]) < int(m[1]):
                raise argparse.ArgumentTypeError(f"range {part!r} runs backwards")
            values += [one(v) for v in range(int(m[1]), int(m[2]) + 1)] if m else [one(part)]
        return values
    parse.__name__ = f"{kind.__name__} list"
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
    """A chapter's `main()`: demo(args), a ValueError, OSError or ImportError (`load`'s) becoming one `error:` line."""
    try:
        demo(args)
    except (ValueError, OSError, ImportError) as error:
        sys.exit(f"error: {error}")


def start(script_file, args):
    """A demo's first line: seed torch (CPU and every GPU) with --seed; return the device and output folder (created)."""
    torch.manual_seed(args.seed)
    return get_device(args.device), out_dir(script_file, args.outdir)


def out_dir(script_file, outdir=None):
    """Create and return the output folder: `outdir`, or out/<script name>/."""
    path = outdir or os.path.join("out", os.path.splitext(os.path.basename(script_file))[0])
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):   # the path, or a folder above it, is a file: say so in words
        raise NotADirectoryError(f"--outdir {path} is (or lies inside) a file, not a folder; pass a folder") from None
    return path


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Write a temporary file that replaces `path` only once complete: no reader (or crash) sees half a file."""
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
    """Path of `url`'s file in torch.hub's cache (~/.cache/torch/hub/checkpoints), downloaded on first use."""
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
# torchrun: plain `python` is one process; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK.

def init_distributed(device_name="auto"):
    """Join torchrun's process group if there is one (even of one process); (rank, world_size, device). NCCL on
    GPUs (told the GPU of this LOCAL_RANK: else it guesses from the global rank, wrong on a second node), gloo."""
    device = get_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
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
    """fn(*args) on each node's first process (LOCAL_RANK 0) -- it may download into the node's cache -- then on
    the node's other processes, which wait at a barrier until it is done."""
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
