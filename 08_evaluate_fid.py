"""08_evaluate_fid.py -- FID as the paper measures it (Table 2: 1.79 / 1.97 on CIFAR-10 at 35 NFE), and ours alike.

    FID = |mu_g - mu_r|^2 + tr(Sigma_g + Sigma_r - 2 (Sigma_g Sigma_r)^(1/2))          (Heusel et al. 2017)

with (mu, Sigma) the mean and covariance of 2048-d Inception-v3 features of generated (g) and real (r) images.
The number depends on every detail, so this file follows the official generate.py + fid.py, in their order:
1. generation: 50,000 images, each a function of its seed only, quantized to uint8 as a PNG stores them; 2. the
detector: NVIDIA's TorchScript port of the TF graph `inception-2015-12-05`; 3. statistics: mu and Sigma as
float64 sums over batches and GPUs; 4. the Frechet distance, the minimum over three seed sets of 50,000.

Subcommands (each has --help): demo (the default: FID's bias with the number of images), generate, ref
(statistics of a data set), calc (FID of a folder of images), fid (the whole protocol). FID needs only common.py;
generation 04 and 06 (+05); 03's, 09's and 10's samplers and guidance plug in when their flags ask. E.g.
  python 08_evaluate_fid.py generate --network <07 run>/network-snapshot-000064.pt --seeds 0-63
  torchrun --standalone --nproc_per_node=8 08_evaluate_fid.py fid --network edm-cifar10-32x32-cond-vp.pkl \\
      --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
"""

import argparse
import io
import json
import os
import pathlib
import re
import sys
import time
import warnings
import zipfile

import numpy as np
import PIL.Image
import torch
import tqdm

import common

# ----------------------------------------------------------------------------
# 1. Generation, each image a function of its seed only, whatever the batch size or the number of GPUs (under
# torchrun each rank takes every world_size-th batch).

def generate_batch(net, seeds, device, sample=None, class_idx=None):
    """uint8 images [N, C, H, W] for the seeds. As in the official generate.py, each seed's generator draws the
    latents, then (for a conditional network) the class label, then the sampler's noise. `sample(net, latents,
    extra_args, randn_like)` is one of 03's, 04's or 09's make_sampler (default: 04's Algorithm 2, 35 NFE)."""
    rnd = common.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:      # drawn under --class too, so that the sampler's noise stays the same
        labels = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        labels = labels if class_idx is None else torch.full_like(labels, class_idx)
        class_labels = torch.eye(net.label_dim, device=device)[labels]
    sample = sample or common.load("04_stochastic_sampler").make_sampler()
    with torch.no_grad():
        x = sample(net, latents, {"class_labels": class_labels}, rnd.randn_like)
    return common.to_uint8(x).permute(0, 3, 1, 2)


def load_net(path, device):
    """06's load_network (an official pickle, path or URL, or a 07 snapshot; its errors name the file) on `device`,
    as 06's for_sampling prepares networks to sample with."""
    ch06 = common.load("06_unet")
    return ch06.for_sampling(ch06.load_network(path), device)


def rank_batches(items, batch_size):
    """Batches of at most batch_size, dealt round-robin to the ranks (as the official code). Every rank gets the
    same number of batches (some possibly empty), so that collective calls line up."""
    world = common.get_world_size()
    num_batches = ((len(items) - 1) // (batch_size * world) + 1) * world
    return torch.as_tensor(items).tensor_split(num_batches)[common.get_rank()::world]


def progress(batches, what):
    """Rank 0 reports: a tqdm bar on a terminal; in a log (stdout not a terminal) about ten plain lines."""
    if common.get_rank() != 0 or sys.stdout.isatty():
        yield from tqdm.tqdm(batches, desc=what, unit="batch", dynamic_ncols=True, disable=common.get_rank() != 0)
        return
    start, every = time.time(), -(-len(batches) // 10)
    for i, batch in enumerate(batches, 1):
        yield batch
        if i % every == 0 or i == len(batches):
            print(f"  {what}: batch {i}/{len(batches)}, {time.time() - start:.1f} s", flush=True)


def png_path(outdir, seed, subdirs):
    return os.path.join(outdir, f"{seed - seed % 1000:06d}" if subdirs else "", f"{seed:06d}.png")


def generate_pngs(net, seeds, outdir, batch_size, device, subdirs=False, class_idx=None, sample=None):
    """Write {seed:06d}.png for this rank's share of the seeds."""
    for batch in progress(rank_batches(seeds, batch_size), "generate"):
        images = generate_batch(net, batch.tolist(), device, sample, class_idx) if len(batch) else []
        for seed, image in zip(batch.tolist(), images):
            path = png_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            PIL.Image.fromarray(image.permute(1, 2, 0).squeeze(2).numpy()).save(path)


# ----------------------------------------------------------------------------
# 2. The detector: the 2048-d pool features of the TF graph `inception-2015-12-05`, which FID is defined by. NVIDIA's
# TorchScript port of it resizes uint8 NCHW images to 299x299 and scales them as the graph does; the official fid.py
# loads it from a pickle, we from the same port's TorchScript file (no Python object unpickled).

DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FEATURE_DIM = 2048


def load_detector(spec, device):
    """`nvidia` (the paper's, downloaded once) or the path of a TorchScript file called as NVIDIA's (offline: that
    download; tools/standin_detector.py's): detector(uint8 NCHW images) -> [N, detector.feature_dim] features."""
    path = common.download(DETECTOR_URL, "the Inception detector") if spec == "nvidia" else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detector file not found: {path}; pass nvidia or the path of a TorchScript "
                                f"detector (e.g. a download of {DETECTOR_URL})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # "torch.jit is deprecated": the detector is TorchScript
            script = torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read detector {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"is it a complete download of {DETECTOR_URL}?") from None

    @torch.no_grad()
    def detector(images):          # grey images become RGB
        return script(images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images, return_features=True)
    detector.feature_dim = getattr(script, "feature_dim", FEATURE_DIM)     # a stand-in may have its own
    return detector


# ----------------------------------------------------------------------------
# 3. Statistics: mean and covariance as float64 sums, mergeable across batches and GPUs (all_reduce of the
# sums), finalized once. One loop serves generated images (no PNG written) and stored ones.

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


def feature_stats(items, images_of, detector, batch_size, device, what):
    """(mu, sigma) of the features of images_of(batch) for this rank's batches of `items`, summed over ranks."""
    stats = FeatureStats(detector.feature_dim, device)
    for batch in progress(rank_batches(items, batch_size), what):
        if len(batch):
            stats.update(detector(images_of(batch).to(device)))
    stats.all_reduce()
    return stats.mean_cov()


def generated_stats(net, seeds, detector, batch_size, device, class_idx=None, sample=None):
    """(mu, sigma) of the images `generate` would write for these seeds."""
    return feature_stats(seeds, lambda batch: generate_batch(net, batch.tolist(), device, sample, class_idx),
                         detector, batch_size, device, "generate + features")


def image_stats(images, indices, detector, batch_size, device):
    """(mu, sigma) of images[indices]: a uint8 tensor [N, C, H, W] or an ImageFolder."""
    return feature_stats(indices, lambda batch: images_at(images, batch), detector, batch_size, device, "features")


def load_ref(spec, feature_dim):
    """Reference statistics (mu [d], sigma [d, d]) from an .npz path or URL (e.g. the official fid-refs), checked:
    readable, and d the detector's feature_dim."""
    path = common.download(spec, "the reference statistics") if re.match(r"https?://", spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics not found: {path}; make them with the `ref` "
                                f"subcommand or pass an official fid-refs .npz (path or URL)")
    try:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a reference .npz with arrays 'mu' and 'sigma' ({e})") from None
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise ValueError(f"reference {path} has {'x'.join(map(str, mu.shape))}-d statistics but the detector gives "
                         f"{feature_dim}-d features (mu {list(mu.shape)}, sigma {list(sigma.shape)}): made with "
                         f"another detector, or not by `ref`")
    return mu, sigma


def ref_and_detector(ref_spec, detector_spec, device):
    """(reference statistics, detector) for calc and fid. --ref is checked first (it exists, reads, and has the
    paper's detector's 2048-d features), as `nvidia` may be a download; a local detector file is read first, and
    the reference checked against its features."""
    if detector_spec == "nvidia":
        ref = common.rank0_first(load_ref, ref_spec, FEATURE_DIM)
        return ref, common.rank0_first(load_detector, detector_spec, device)
    detector = load_detector(detector_spec, device)
    return common.rank0_first(load_ref, ref_spec, detector.feature_dim), detector


# ----------------------------------------------------------------------------
# 4. The Frechet distance between two Gaussians, in float64.
#
# The official code takes scipy's sqrtm of the non-symmetric S1 S2, which returns complex round-off and loses
# accuracy when the covariances are rank-deficient (fewer images than dimensions, dead features). Instead: with
# S1 = F1 F1^T and S2 = F2 F2^T, S1 S2 is similar to G G^T for G = F1^T F2, so tr((S1 S2)^(1/2)) is the sum of
# G's singular values (its nuclear norm), computed to ~eps |G| and all real.

def psd_factor(sigma):
    """F with F F^T = sigma (symmetric PSD). Eigenvalues below d eps lambda_max are round-off (+-1e-15) and set to
    0, as numpy's matrix_rank does: their square roots (~3e-8) would add up over hundreds of null directions."""
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
# 5. Subcommands. Each checks everything it reads (network, detector, reference, images) before it writes.

def print0(*args):
    if common.get_rank() == 0:
        print(*args, flush=True)


def record(args, sample, counter, counters, images, guidance):
    """(the settings generation.json and fid.json keep, the cost in words); NFE measured on rank 0's own `images`."""
    s = sample.settings
    result = dict(network=location(args.network), class_idx=args.class_idx, solver=s["solver"],
                  sigma_steps=s["sigma_steps"], nfe=counter.per_image(images),
                  network_evaluations=sum(c.per_image(images) for c in counters),
                  sampler={"function": s["function"], "options": s["options"]}, guidance=guidance,
                  gpus=common.get_world_size())
    why = ": each guided call evaluates two networks (CFG: with and without the class; autoguidance: main and " \
          "guide)" if result["network_evaluations"] != result["nfe"] else ""
    return result, f"{result['nfe']} NFE per image (measured; {result['network_evaluations']} network evaluations{why})"


def cmd_generate(args):
    _, _, device = common.init_distributed(args.device)
    sample, counter, counters, guidance = start_generation(args, device)
    outdir = args.outdir or os.path.join("out", "08_evaluate_fid", "images")
    earlier = check_outdir(outdir, args.seeds, args.subdirs, args.add)
    outdir = common.out_dir(__file__, outdir)
    print0(f"Generating {len(args.seeds)} images into {outdir} ({sampler_line(sample, guidance)})...")
    start = time.time()
    generate_pngs(counter, args.seeds, outdir, args.batch, device, args.subdirs, args.class_idx, sample)
    common.gather(None)             # every rank's images are written before rank 0 draws the grid
    if common.get_rank() == 0:
        result, cost = record(args, sample, counter, counters, sum(map(len, rank_batches(args.seeds, args.batch))),
                              guidance)
        common.write_json(earlier + [dict(result, seeds=seed_ranges(args.seeds), num_images=len(args.seeds),
                                          subdirs=args.subdirs, seconds=round(time.time() - start, 1))],
                          os.path.join(outdir, SETTINGS))
        print(f"Done: {len(args.seeds)} PNGs in {outdir}, {cost}; settings in {SETTINGS}, the first images "
              f"in {save_folder_grid(outdir)}. Their FID: `08_evaluate_fid.py calc --images {outdir} --ref <ref.npz> "
              f"-n {len(args.seeds)}` (the paper's protocol needs 50,000: `fid`).")


def cmd_ref(args):
    _, _, device = common.init_distributed(args.device)
    images = common.rank0_first(open_images, args.data, args.data_dir, args.resolution)   # one download per node
    detector = common.rank0_first(load_detector, args.detector, device)
    note_alpha(images)
    print0(f"Computing statistics of {len(images)} images from {args.data}...")
    mu, sigma = image_stats(images, np.arange(len(images)), detector, args.batch, device)
    if common.get_rank() == 0:
        with common.atomic_open(args.dest) as f:   # a reader never sees half a file
            np.savez(f, mu=mu, sigma=sigma)
        print(f"Saved reference statistics to {args.dest}")


def cmd_calc(args):
    _, _, device = common.init_distributed(args.device)
    images = ImageFolder(args.images)
    note_alpha(images)
    if len(images) < args.num:
        raise ValueError(f"found {len(images)} images in {args.images}, but --num is {args.num}; "
                         f"generate more or pass a smaller -n")
    ref, detector = ref_and_detector(args.ref, args.detector, device)
    print0(f"Computing statistics of {args.num} of the {len(images)} images in {args.images}...")
    mu, sigma = image_stats(images, random_subset(len(images), args.num, args.seed), detector, args.batch, device)
    print0(f"FID {frechet_distance(mu, sigma, *ref):g}")


def cmd_fid(args):
    _, _, device = common.init_distributed(args.device)
    sample, counter, counters, guidance = start_generation(args, device)
    ref, detector = ref_and_detector(args.ref, args.detector, device)
    path = os.path.join(common.out_dir(__file__, args.outdir), "fid.json")   # a bad --outdir fails now, not at the end
    start, fids, seed_sets, images = time.time(), [], [], 0       # images: this rank's
    print0(sampler_line(sample, guidance))
    for k in range(args.repeats):
        seeds = list(range(k * args.num, (k + 1) * args.num))
        print0(f"Seeds {seeds[0]}-{seeds[-1]}: generating {args.num} images into statistics...")
        mu, sigma = generated_stats(counter, seeds, detector, args.batch, device, args.class_idx, sample)
        images += sum(map(len, rank_batches(seeds, args.batch)))
        fids.append(frechet_distance(mu, sigma, *ref))
        seed_sets.append(f"{seeds[0]}-{seeds[-1]}")
        print0(f"  FID {fids[-1]:g}")
    if common.get_rank() == 0:
        result, cost = record(args, sample, counter, counters, images, guidance)
        common.write_json(dict(fid=fids, seeds=seed_sets, fid_min=min(fids), **result, num_images=args.num,
                               ref=args.ref, detector=args.detector, seconds=round(time.time() - start, 1)), path)
        print(f"FID min of {args.repeats}: {min(fids):g} at {cost}; result in {path}")


GRID, SETTINGS = "grid.png", "generation.json"     # what `generate` writes beside its images


def location(path):
    """A network or file as generation.json and fid.json record it: a URL as given, a path made absolute."""
    return path if re.match(r"https?://", path) else os.path.abspath(path)


def seed_ranges(seeds):
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8': a seed list as the records keep it."""
    starts = [s for i, s in enumerate(seeds) if i == 0 or seeds[i - 1] != s - 1]
    ends = [s for i, s in enumerate(seeds) if i == len(seeds) - 1 or seeds[i + 1] != s + 1]
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in zip(starts, ends))


def check_outdir(outdir, seeds, subdirs, add):
    """generate writes into a new or empty folder, or with --add into one without these seeds' images, never
    replacing a file; every rank checks its view of the folder before any writes. Returns generation.json's list."""
    problem, earlier, settings = None, [], os.path.join(outdir, SETTINGS)
    if os.path.isdir(outdir) and os.listdir(outdir):
        taken = [s for s in seeds if os.path.exists(png_path(outdir, s, subdirs))]
        if not add:
            problem = (f"{outdir} is not empty (an earlier generate?) and generate never overwrites; pass a new "
                       f"--outdir, or --add to add images of other seeds to it")
        elif taken:
            problem = (f"{png_path(outdir, taken[0], subdirs)} exists ({len(taken)} of these seeds' images do) and "
                       f"--add never replaces images; pass seeds not yet in {outdir}, or a new --outdir")
        elif os.path.isfile(settings):
            try:
                earlier = json.loads(pathlib.Path(settings).read_text())
            except ValueError:
                earlier = None
            if not isinstance(earlier, list):
                problem = f"{settings} is not generate's list of settings; pass a new --outdir"
    problems = [p for p in common.gather(problem) if p]
    if problems:
        raise FileExistsError(problems[0])
    return earlier


def save_folder_grid(outdir, count=64):
    """grid.png: the first `count` images (lowest seeds) in whole rows of 8, >= 512 pixels wide, pixels sharp."""
    import torchvision
    folder = ImageFolder(outdir)
    ncol = min(8, len(folder))
    images = folder.batch(range(min(count, len(folder)) // ncol * ncol)).float() / 255
    scale = max(1, -(-512 // (ncol * images.shape[-1])))
    path = os.path.join(outdir, GRID)
    torchvision.utils.save_image(torch.nn.functional.interpolate(images, scale_factor=scale), path, nrow=ncol,
                                 padding=scale, pad_value=1)
    return path


# ----------------------------------------------------------------------------
# 6. The demo: the Frechet distance on Gaussian "features" whose true FID is known. FID is estimated from n
# images, and the estimate is biased upward (two sets drawn from the same distribution give FID > 0) by terms
# that shrink like 1/n: FIDs are comparable only at the same n (50k), and the paper repeats the measurement with
# three seed sets and reports the minimum.

def demo(args):
    from matplotlib.figure import Figure
    device, outdir = common.start(__file__, args)
    d, g = 64, torch.Generator().manual_seed(args.seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # a shared eigenbasis
    lam = torch.linspace(0.1, 2.0, d, dtype=torch.float64) ** 2                 # real-image covariance spectrum
    mu_shift, sigma_r = torch.full([d], 0.05, dtype=torch.float64), q @ torch.diag(lam) @ q.T
    factors = {"real": psd_factor(sigma_r), "gen": psd_factor(q @ torch.diag(lam * 1.1) @ q.T)}  # 10% too much variance
    true_fid = float(mu_shift.square().sum() + (lam.sqrt() - (1.1 * lam).sqrt()).square().sum())
    print(f"{d}-d Gaussian 'features', the generator's mean off by 0.05 and its variance 10% too large. Closed-form "
          f"FID(generator, real) = {true_fid:.5f}; each estimate uses n samples against the exact real statistics.")

    def fid_of(which, mean, n):
        stats = FeatureStats(d, device)
        stats.update(torch.randn(n, d, generator=g, dtype=torch.float64) @ factors[which].T + mean)
        return frechet_distance(*stats.mean_cov(), np.zeros(d), sigma_r)

    ns, same, gen = [500, 1000, 2000, 5000, 10000, 20000, 50000], [], []
    print(f"{'n':>6} {'FID(real vs real)':>18} {'n x bias':>9} {'FID(gen vs real), 3 seed sets':>31} {'min':>8}")
    for n in ns:
        same.append(fid_of("real", 0, n))
        gen.append([fid_of("gen", mu_shift, n) for _ in range(3)])
        print(f"{n:6d} {same[-1]:18.5f} {n * same[-1]:9.1f} {' '.join(f'{v:9.5f}' for v in gen[-1]):>31} "
              f"{min(gen[-1]):8.5f}")

    fig = Figure(figsize=(7, 4.5))
    ax, c = fig.subplots(), same[-1] * ns[-1]
    ax.loglog(ns, same, "o-", color="C0", label="same distribution (true FID 0)")
    ax.loglog(ns, [c / n for n in ns], "-", color="0.75", lw=6, zorder=0, label=f"{c:.0f} / n (guide)")
    ax.loglog(ns, gen, "s", ms=4, color="C1", alpha=0.8, label=["generator, 3 seed sets", "_", "_"])
    ax.axhline(true_fid, color="C1", ls="--", label=f"generator, true FID {true_fid:.3f}")
    ax.set_xticks(ns, [f"{n // 1000}k" if n >= 1000 else str(n) for n in ns], minor=False)
    ax.set(xlabel="number of images n", ylabel="FID estimate (64-d Gaussian features)",
           title="FID is biased upward by ~1/n: compare only at equal n (50k)")
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path := os.path.join(outdir, "fid_vs_n.png"), dpi=120)
    print(f"\nWhat this shows ({path}):")
    print(f"  * Blue: two samples of the SAME distribution still score FID > 0, and that bias falls like 1/n "
          f"(n x bias stays near {c:.0f}; grey guide).")
    print(f"  * Orange: the generator's estimates sit above its true FID {true_fid:.3f} (dashed line) by about the "
          f"same bias; at n = 50k the three seed sets differ by only {max(gen[-1]) - min(gen[-1]):.4f}.")
    print("  * So FIDs compare only at equal n: the paper's (Table 2) use 50,000 images, the minimum over 3 seed sets."
          "\nNext, a network measured the same way: 08 generate --network ... (PNGs), fid --network ... --ref ...")


# ----------------------------------------------------------------------------
# 7. Image sets: a folder or .zip of images (the official dataset-tool layout, searched recursively, sorted),
# or what 07 trains on (CIFAR-10's training set, 07's shapes), held as a uint8 tensor [N, C, H, W].

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolder:
    """The one reader of image folders (07 --data, ref, calc, tools/nearest.py): a folder or .zip (recursive,
    sorted by relative name, without the grid.png `generate` writes), decoded when read: `read(i)` is uint8
    [C, H, W]. Decided up front from the headers: C = 1 if every image is greyscale, else 3 (grey repeated); one
    size for all, or with `resolution` R each made R x R by the official dataset_tool.py's center crop (`resized`:
    their indices). An alpha channel 255 everywhere is dropped (`opaque_alpha`: those files); transparency is
    refused (what to composite on is the user's call). `files`: everything in it; `data(name)`: a file's bytes."""

    def __init__(self, path, resolution=None):
        self.path, self.resolution, self._zip = path, resolution, zipfile.is_zipfile(path) and zipfile.ZipFile(path)
        if not (self._zip or os.path.isdir(path)):
            raise ValueError(f"{path!r} is neither a folder nor a .zip file of images") if os.path.exists(path) \
                else FileNotFoundError(f"{path!r}: no such folder or .zip of images")
        self.files = set(self._zip.namelist() if self._zip else (os.path.relpath(os.path.join(root, f), path).replace(
            os.sep, "/") for root, _, names in os.walk(path) for f in names))
        self.names = sorted(n for n in self.files if n.lower().endswith(IMAGE_EXTENSIONS)
                            and not (n == GRID and SETTINGS in self.files))
        if not self.names:
            raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {path!r}")
        def header(image):   # (size, greyscale?, the smallest alpha or 256 if none): only an alpha channel is decoded
            alpha = image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info
            return (image.size, image.getbands() in (("1",), ("L",), ("L", "A"), ("I",), ("F",)),
                    image.convert("RGBA").getextrema()[3][0] if alpha else 256)
        sizes, grey, alpha = zip(*(self._open(name, header) for name in self.names))
        if min(alpha) < 255:
            raise ValueError(f"{next(n for n, a in zip(self.names, alpha) if a < 255)!r} in {path!r} is transparent "
                             f"(alpha < 255); composite it on a background of your choice first")
        self.opaque_alpha, self.channels = [n for n, a in zip(self.names, alpha) if a == 255], 1 if all(grey) else 3
        odd = [i for i, s in enumerate(sizes) if s != sizes[0] and resolution is None]
        if odd:
            raise ValueError(f"{self.names[odd[0]]!r} is {'%dx%d' % sizes[odd[0]]} but {self.names[0]!r} is "
                             f"{'%dx%d' % sizes[0]}; all images in {path!r} must have one size")
        self.resized = {i for i, s in enumerate(sizes) if resolution and s != (resolution, resolution)}

    def __len__(self):
        return len(self.names)

    def data(self, name):
        return self._zip.read(name) if self._zip else pathlib.Path(self.path, name).read_bytes()

    def _open(self, name, use):
        """use(file `name` opened by PIL, which decodes nothing until asked); a damaged file is a ValueError."""
        try:
            with PIL.Image.open(io.BytesIO(self.data(name)) if self._zip else os.path.join(self.path, name)) as image:
                return use(image)
        except Exception as error:   # a damaged file can raise many kinds
            raise ValueError(f"cannot read image {name!r} in {self.path!r} ({type(error).__name__}: {error})") from None

    def read(self, i):
        """Image i as a uint8 numpy array [C, H, W] in the folder's channels; with `resolution` R the official center
        crop: the central min(W, H) square, resized (LANCZOS) to R x R (PIL leaves an R x R image as it is)."""
        def decode(image):
            (w, h), r, side = image.size, self.resolution, min(image.size)
            image = image.convert("L" if self.channels == 1 else "RGB")
            return np.array(image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).resize(
                (r, r), PIL.Image.Resampling.LANCZOS) if r else image)
        array = self._open(self.names[i], decode)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def batch(self, indices):
        """Images `indices` as a uint8 tensor [N, C, H, W]."""
        return torch.from_numpy(np.stack([self.read(int(i)) for i in indices]))


def note_alpha(*image_sets):
    """The run's one note on the image files whose alpha channel, 255 everywhere, was dropped."""
    files = [os.path.join(s.path, n) for s in image_sets if isinstance(s, ImageFolder) for n in s.opaque_alpha]
    if files:
        print0(f"note: dropped the opaque alpha channel (all 255) of {len(files)} image file(s) (first: {files[0]})")


def images_at(images, indices):
    """uint8 [N, C, H, W]: images[indices] of a uint8 tensor or an ImageFolder."""
    return images[torch.as_tensor(indices, dtype=torch.long)] if torch.is_tensor(images) else images.batch(indices)


def open_images(spec, data_dir, resolution=None):
    """ref's --data, what 07 trains on: cifar10 (in data_dir), shapes (07's, `resolution` pixels square, default 16)
    or a folder/.zip of images (with `resolution`: center-cropped and resized to it, as 07 trains on them)."""
    if spec == "shapes":     # drawn by 07's code, so the reference is the very training set of a 07 run
        return common.load("07_train_cifar10").make_shapes_dataset(4096, resolution or 16)[0]
    if spec != "cifar10":
        return ImageFolder(spec, resolution)
    if resolution not in (None, 32):
        raise ValueError(f"CIFAR-10's images are 32x32, not --resolution {resolution}")
    return common.load("07_train_cifar10").load_cifar10(data_dir)[0]


def random_subset(n_total, num, seed):
    """The official rule: all images if there are exactly `num`, else a seeded random subset, sorted."""
    return np.sort(np.random.RandomState(seed % (1 << 31)).permutation(n_total)[:num]) if n_total > num else \
        np.arange(n_total)


# ----------------------------------------------------------------------------
# 8. Command line. The chapters that own a sampler or guidance build it from the options (04's, 03's and 09's
# make_sampler, 10's guidance), each loaded only by a flag that asks for it (a missing file: one error line).

CHURN_OPTIONS = ("S_churn", "S_min", "S_max", "S_noise")
SOLVER_NAMES = ("euler", "heun", "dpmpp2m", "dpmpp3m", "ipndm")  # 09's SOLVERS, for --help without 09 (tested)
SIGMA_STEP_KINDS = ("edm", "logsnr", "time_uniform")            # 09's sigma_steps kinds


def flag(name):
    """The option of a sampler setting: sigma_min -> --sigma-min, S_churn -> --S-churn (dashes, the paper's case)."""
    return "--" + name.replace("_", "-")


def sampler_from_args(args):
    """The sampler the command line asks for, checked before anything runs."""
    steps = {k: getattr(args, k) for k in ("sigma_min", "sigma_max", "rho") if getattr(args, k) is not None}
    churn = {k: getattr(args, k) for k in CHURN_OPTIONS if getattr(args, k) is not None}
    if min(steps.values(), default=1) <= 0 or steps.get("sigma_min", 0) >= steps.get("sigma_max", float("inf")):
        raise ValueError(f"Eq. 5 needs 0 < --sigma-min < --sigma-max and --rho > 0, got {steps}")
    solver = args.solver or "heun"
    num_steps = args.num_steps if args.nfe is None else common.load("09_fast_samplers").steps_for_nfe(solver, args.nfe)
    if num_steps == 1:
        raise ValueError("--steps 1 is for a consistency model (chapter 12); an ODE sampler needs at least 2 steps")
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


def start_generation(args, device):
    """What generate and fid run, checked before anything is written: (sample; the denoiser it calls, counted: NFE
    as the paper counts it; a common.CountingDenoiser on each network, the guide's evaluations too; the guidance
    settings). The denoiser is the network, or the network guided by chapter 10's guidance (--guidance ...)."""
    main = common.CountingDenoiser(common.rank0_first(load_net, args.network, device))
    sample = getattr(main, "sampler_from_args", sampler_from_args)(args)   # a consistency model has its own (12)
    if args.class_idx is not None and not args.class_idx < main.label_dim:
        raise ValueError(f"--class {args.class_idx} but the network has {main.label_dim} classes")
    if args.guidance == 1 and args.guide_network is None and args.guidance_interval is None:
        return sample, common.CountingDenoiser(main), [main], dict(w=1.0, method="none", guide_network=None,
                                                                   interval=None)
    guide = None if args.guide_network is None else \
        common.CountingDenoiser(common.rank0_first(load_net, args.guide_network, device))
    denoiser, guidance = common.load("10_guidance").guidance(main, args.guidance, guide, args.guidance_interval)
    guidance["guide_network"] = None if guide is None else location(args.guide_network)
    return sample, common.CountingDenoiser(denoiser), [main] + [guide] * (guide is not None), guidance


def sampler_line(sample, guidance):
    """One line for the log: the sampler, its options, the guidance."""
    s = sample.settings
    return f"{s['function']}: {s['solver']} on {s['sigma_steps']} steps" + "".join(
        f", {k}={v}" for k, v in s["options"].items()) + "; guidance: " + ", ".join(
        f"{k}={v}" for k, v in guidance.items() if v is not None)


def add_generation_options(p):
    """--network, --class and the options of the samplers (04's, 03's, 09's) and of guidance (10's)."""
    p.add_argument("--network", required=True, help="an official .pkl (path or URL) or a 07 snapshot")
    p.add_argument("--class", dest="class_idx", metavar="LABEL", type=common.number(int, 0), default=None,
                   help="class label for every image (default: random per seed)")
    g = p.add_argument_group("sampler (default: 04's Algorithm 2, Heun on Eq. 5's steps, 18 steps = 35 NFE)")
    g.add_argument("--solver", choices=SOLVER_NAMES, help="heun: 04's Algorithm 2 (09's Heun with --sigma-steps); "
                   "the others: 09's solvers; with --disc/--schedule/--scaling: 03's ablation sampler, euler or heun")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--steps", dest="num_steps", metavar="N", type=common.number(int, 1), help="(default: 18)")
    budget.add_argument("--nfe", metavar="N", type=common.number(int, 1), help="network evaluations per image instead")
    g.add_argument("--sigma-steps", choices=SIGMA_STEP_KINDS, help="09's step kinds (default: the solver's own)")
    for name in ("sigma_min", "sigma_max", "rho") + CHURN_OPTIONS:   # --sigma-min; --sigma_min as the official code
        g.add_argument(flag(name), *[f"--{name}"] * ("_" in name), dest=name, metavar=name.upper(),
                       type=common.number(float, 0), help="Algorithm 2" if name in CHURN_OPTIONS else "Eq. 5 (> 0)")
    g.add_argument("--disc", dest="discretization", choices=["vp", "ve", "iddpm", "edm"], help="ablation: time steps")
    g.add_argument("--schedule", choices=["vp", "ve", "linear"], help="ablation: sigma(t)")
    g.add_argument("--scaling", choices=["vp", "none"], help="ablation: s(t)")
    g = p.add_argument_group("guidance (chapter 10; default: none)")
    g.add_argument("--guidance", metavar="W", type=common.number(float, 0), default=1.0,
                   help="weight w: D_w = D_guide + w (D_main - D_guide) (default: 1 = off)")
    g.add_argument("--guide-network", metavar="PATH", help="autoguidance by a weaker network of the same task; "
                   "without it CFG on --network's zero-class output (trained with 07 --label-dropout)")
    g.add_argument("--guidance-interval", metavar="LO,HI", type=common.number_list(float, 0),
                   help="guide only for sigma in [LO, HI] (default: all sigma)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    count = lambda low: common.number(int, low)
    num = "(default: 50000; under torchrun write -n: torchrun takes --num for its --numa-binding)"

    def add(name, fn, text, detector=False, generation=False):
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        p.set_defaults(run=fn)
        if generation:
            add_generation_options(p)
        if detector:
            p.add_argument("--detector", default="nvidia", help="nvidia (the paper's Inception, the default) or the "
                           "path of a TorchScript detector (e.g. the downloaded .pt)")
        if detector or generation:
            p.add_argument("--batch", type=count(1), default=64, help="batch size per GPU (default: 64)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto; under torchrun "
                       "each rank takes the GPU of its LOCAL_RANK)")
        return p

    p = add("demo", demo, "Frechet distance on Gaussians with known FID (the default; a few seconds).")
    p.add_argument("--seed", type=count(0), default=0, help="random seed (default: 0)")
    p.add_argument("--outdir", help="where the figure goes (default: out/08_evaluate_fid/)")
    p = add("generate", cmd_generate, "Generate {seed:06d}.png images (each a function of its seed only), "
            "grid.png and generation.json.", generation=True)
    p.add_argument("--seeds", type=common.number_list(int, 0, ranges=True), default="0-63",
                   help="e.g. 0-49999 or 0,5,7-9 (default: 0-63)")
    p.add_argument("--subdirs", action="store_true", help="one subfolder per 1000 seeds")
    p.add_argument("--outdir", help="a new or empty folder, never overwritten (default: out/08_evaluate_fid/images/)")
    p.add_argument("--add", action="store_true", help="add other seeds' images to --outdir (none is replaced)")
    p = add("ref", cmd_ref, "Reference statistics (mu, sigma) of a data set, written to an .npz.", detector=True)
    p.add_argument("--data", required=True, help="what 07 trained on: cifar10, shapes or a folder/.zip of images")
    p.add_argument("--data-dir", help="where cifar-10-python.tar.gz is (default: 07's out/data)")
    p.add_argument("--resolution", type=count(4), help="the shapes' size (default 16); folders resized to it as by 07")
    p.add_argument("--dest", required=True, help="output .npz")
    p = add("calc", cmd_calc, "FID of a folder/.zip of images against reference statistics.", detector=True)
    p.add_argument("--images", required=True, help="folder or .zip of images")
    p.add_argument("--ref", required=True, help="reference .npz (path or URL)")
    p.add_argument("-n", "--num", type=count(2), default=50000, help=f"images; a seeded subset of more {num}")
    p.add_argument("--seed", type=count(0), default=0, help="seed of that subset (default: 0)")
    p = add("fid", cmd_fid, "The paper's protocol: FID of --repeats seed sets of --num images, and the minimum.",
            detector=True, generation=True)
    p.add_argument("--ref", required=True, help="reference .npz (path or URL)")
    p.add_argument("-n", "--num", type=count(2), default=50000, help=f"images per seed set {num}")
    p.add_argument("--repeats", type=count(1), default=3, help="seed sets 0..num-1, num..2num-1, ... (default: 3)")
    p.add_argument("--outdir", help="where fid.json goes (default: out/08_evaluate_fid/)")
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
