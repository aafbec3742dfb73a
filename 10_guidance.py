"""10 -- Guidance: classifier-free guidance and autoguidance, seen where the truth is known (beyond the paper).

Guidance replaces the denoiser D_main(x; sigma) that a sampler calls by an extrapolation away from a second,
"guiding" denoiser:

    D_w(x; sigma) = D_guide(x; sigma) + w (D_main(x; sigma) - D_guide(x; sigma)).

Since D = x + sigma^2 grad log p (Eq. 3), D_w is the denoiser of p_guide^(1 - w) p_main^w at each sigma.
* Classifier-free guidance (CFG; Ho & Salimans 2022): the guide is the same network given the zero class vector,
  its unconditional model if it was trained with label dropout (06's `drop_labels`, 07 --label-dropout).
* Autoguidance (Karras et al. 2024): the guide is a weaker model of the same task (smaller, or earlier in training).
* Guidance interval (Kynkaanniemi et al. 2024): guide only for sigma in [lo, hi], D_main elsewhere.
`GuidedDenoiser` looks like a network to every sampler here (03, 04, 09); `guidance` is what 08's --guidance,
--guide-network and --guidance-interval build.

The demo samples an exact 2-D class mixture (three spiral arms of small Gaussians) with 04's Algorithm 2 under
CFG, autoguidance and CFG on an interval, and scores the samples against the true class density; with --network
it shows a trained network's images at growing w instead.

  python 10_guidance.py                  # the 2-D demo, about a minute on one thread; figures in out/10_guidance/
  python 07_train_cifar10.py --preset tiny --label-dropout 0.1 --outdir out/10_tiny    # a network for CFG, then
  python 10_guidance.py --network out/10_tiny/network-snapshot-000064.pt \\
                        --guide-network out/10_tiny/network-snapshot-000016.pt      # network_grid.png
"""

import math
import os
import re
import sys
import time

import torch

import common

# ----------------------------------------------------------------------------
# The guided denoiser.

class GuidedDenoiser:
    """D_w(x; sigma) = D_main + (w - 1) (D_main - D_guide) for sigma in `interval`, else D_main.

    Written as a correction to D_main rather than as D_guide + w (D_main - D_guide), so that
    w = 1 and a guide equal to the main model both give D_main exactly, bit for bit. Outside the
    interval (and at w = 1) the guide is not evaluated at all. `interval` = (lo, hi) is closed;
    None means every sigma.

    Samplers see the main network: the attributes they read (noise range, `round_sigma`, image
    shape, `label_dim`) are the main network's.
    """

    SAMPLER_ATTRIBUTES = ("sigma_min", "sigma_max", "round_sigma", "img_resolution", "img_channels", "label_dim")

    def __init__(self, net, guide, w, interval=None):
        w = float(w)
        if not math.isfinite(w):
            raise ValueError(f"guidance weight w must be a finite number, got {w}")
        lo, hi = (0.0, math.inf) if interval is None else map(float, interval)
        if not 0 <= lo <= hi:
            raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
        self.net, self.guide, self.w, self.interval = net, guide, w, (lo, hi)

    def __getattr__(self, name):
        if name in GuidedDenoiser.SAMPLER_ATTRIBUTES:
            return getattr(self.net, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __call__(self, x, sigma, **extra_args):
        D_main = self.net(x, sigma, **extra_args)
        lo, hi = self.interval
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64)
        inside = (sigma64 >= lo) & (sigma64 <= hi)          # one flag, or one per sample
        if self.w == 1 or not inside.any():
            return D_main
        D_guide = self.guide(x, sigma, **extra_args)
        D_w = D_main + (self.w - 1) * (D_main - D_guide)
        if inside.all():
            return D_w
        # Per-sample noise levels on both sides of the interval: guide only the rows inside.
        return torch.where(inside.reshape(-1, *[1] * (D_main.ndim - 1)), D_w, D_main)


class LabelDropped:
    """The guide of classifier-free guidance: the same network, given the zero class vector.

    A network trained with label dropout p (06's `drop_labels`) saw its class vector zeroed with
    probability p, so it has learnt the unconditional denoiser at that input.
    """

    def __init__(self, net):
        if getattr(net, "label_dim", None) == 0:
            raise ValueError("classifier-free guidance needs a class-conditional network (label_dim > 0); "
                             "give a guide network for autoguidance instead")
        self.net = net

    def __call__(self, x, sigma, class_labels=None, **extra_args):
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels to drop")
        return self.net(x, sigma, class_labels=torch.zeros_like(class_labels), **extra_args)


def guided(net, w, guide_net=None, interval=None):
    """`net` guided with weight w: autoguidance by `guide_net` if given, else CFG on `net` itself."""
    return GuidedDenoiser(net, LabelDropped(net) if guide_net is None else guide_net, w, interval)


def guidance(net, w, guide_net=None, interval=None):
    """What 08's --guidance W [--guide-network] [--guidance-interval LO,HI] runs: (the guided denoiser, its settings
    for the records). `interval` is the option's list of numbers (common.number_list) or None. Autoguidance's
    guide must make the main network's images; CFG on a network trained without label dropout warns (rank 0)."""
    interval = None if interval is None else interval_of(interval)
    denoiser = guided(net, w, guide_net, interval)                 # CFG: refuses an unconditional network
    if guide_net is not None:
        check_same_task(net, guide_net)
    elif w != 1 and (warning := label_dropout_warning(net)) and common.get_rank() == 0:
        print(warning, file=sys.stderr, flush=True)
    return denoiser, dict(w=float(w), method="cfg" if guide_net is None else "autoguidance",
                          interval=None if interval is None else list(interval))


def interval_of(values):
    """[LO, HI] (a --guidance-interval, common.number_list(float, 0)) -> (lo, hi), checked: 0 <= LO <= HI."""
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"guidance interval must be two numbers LO,HI with 0 <= LO <= HI (e.g. 0.3,3), got "
                         f"{','.join(f'{v:g}' for v in values)}")
    return tuple(values)


def check_same_task(net, guide):
    """Autoguidance needs a guide for the same images and classes as the main network."""
    shape = lambda n: f"{n.img_resolution}x{n.img_resolution}x{n.img_channels} with {n.label_dim} classes"
    if shape(guide) != shape(net):
        raise ValueError(f"the guide network makes {shape(guide)} images, the main network {shape(net)}; "
                         f"autoguidance needs a (weaker) network of the same task")


def label_dropout_warning(net):
    """A warning line if `net` was trained without label dropout (its configuration has no label_dropout > 0: 07
    records it only when > 0, the official checkpoints were trained without), else None. CFG's guide is the
    network's zero-class output, which such a network never saw in training: what it returns there is untrained,
    and guiding away from it distorts images instead of sharpening their class."""
    config = getattr(net, "init_config", None)          # networks built by 06 (official pickles, 07 snapshots)
    if config is None or config["kwargs"].get("label_dropout", 0) > 0:
        return None
    return ("warning: the network was trained without label dropout (--label-dropout 0: none in its configuration), "
            "so CFG's guide, its zero-class output, is untrained; train with 07 --label-dropout 0.1, or give "
            "--guide-network (autoguidance)")


# ----------------------------------------------------------------------------
# Exact ground truth: a class-conditional mixture of isotropic Gaussians in 2-D.

class ClassMixture:
    """p(y | c) = sum over the components k of class c of pi_k N(y; mu_k, s_k^2 I) / P(c).

    Calling it, `mix(x, sigma, class_labels)`, gives the exact denoiser E[y | x] for
    x = y + sigma n, so it stands in for a network in every sampler: a one-hot class_labels row
    conditions on that class, a zero row (or None) is the unconditional model -- the
    convention CFG feeds a network trained with label dropout. For a Gaussian mixture,
    p(x; sigma) is the same mixture with variances s_k^2 + sigma^2, and

        D(x; sigma) = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
        r_k(x) proportional to pi_k N(x; mu_k, (s_k^2 + sigma^2) I)           (responsibilities).
    """

    def __init__(self, means, stds, classes, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)                  # [K, 2]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(len(self.means)).clone()  # [K]
        self.classes = torch.as_tensor(classes, dtype=torch.long)                 # [K] class of each component
        self.label_dim = int(self.classes.max()) + 1
        self.component_classes = torch.nn.functional.one_hot(self.classes, self.label_dim).T.to(torch.float64)  # [C, K]
        weights = torch.ones(len(self.means), dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        self.weights = weights / weights.sum()

    def widened(self, factor):
        """The same mixture with every component `factor` times wider."""
        return ClassMixture(self.means, self.stds * factor, self.classes, self.weights)

    def _log_weights(self, class_labels, device):
        """log of pi_k renormalised to each row's class: [N, K] (-inf off the class), [1, K] unconditional."""
        class_prior = self.weights @ self.component_classes.T                                   # P(c), [C]
        log_within = (self.weights / class_prior[self.classes]).log().to(device)               # pi_k / P(c_k)
        # Class weights per row: the label's classes weighted by P(c); a zero row (or None) is every class.
        labels = torch.ones(1, self.label_dim, dtype=torch.float64, device=device) if class_labels is None else \
            class_labels.to(torch.float64)
        unconditional = (labels == 0).all(dim=1, keepdim=True)
        class_weights = torch.where(unconditional, 1.0, labels) * class_prior.to(device)      # [N or 1, C]
        class_weights = class_weights / class_weights.sum(dim=1, keepdim=True)
        return log_within + class_weights.log()[:, self.classes.to(device)]

    def _log_terms(self, x, sigma, class_labels):
        """log(pi_k N(x; mu_k, (s_k^2 + sigma^2) I)) per row and component ([N, K]), and the variances."""
        x = torch.as_tensor(x, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        means = self.means.to(x.device)
        var = self.stds.to(x.device) ** 2 + sigma ** 2                                          # [N or 1, K]
        sq_dist = (x ** 2).sum(1, keepdim=True) - 2 * x @ means.T + (means ** 2).sum(1)         # |x - mu_k|^2
        log_terms = self._log_weights(class_labels, x.device) - sq_dist / (2 * var) - torch.log(2 * math.pi * var)
        return log_terms, var

    def denoise(self, x, sigma, class_labels=None):
        log_terms, var = self._log_terms(x, sigma, class_labels)
        r = torch.softmax(log_terms, dim=1)
        s2 = self.stds.to(var.device) ** 2
        # sum_k r_k (mu_k + s_k^2/var_k (x - mu_k)) = sum_k r_k (1 - s_k^2/var_k) mu_k + (sum_k r_k s_k^2/var_k) x
        shrink = r * s2 / var
        return (r - shrink) @ self.means.to(x.device) + shrink.sum(1, keepdim=True) * x.to(torch.float64)

    __call__ = denoise

    def log_density(self, x, class_labels=None, sigma=0.0):
        """log p(x | c; sigma) (per row), exact."""
        return torch.logsumexp(self._log_terms(x, sigma, class_labels)[0], dim=1)

    def sample(self, classes, generator=None):
        """One exact sample of p(y | c) per entry of `classes`."""
        n = len(classes)
        probs = self.weights * (self.classes[None, :] == classes[:, None])
        k = torch.multinomial(probs, 1, generator=generator).flatten()
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise


def spiral_mixture(num_classes=3, per_class=96, std=0.04):
    """Each class one arm of a spiral (radius 0.2 -> 1.5 over 0.8 turns), `per_class` components of width `std`."""
    t = torch.linspace(0, 1, per_class, dtype=torch.float64)
    means, classes = [], []
    for c in range(num_classes):
        angle = 2 * math.pi * (c / num_classes + 0.8 * t)
        radius = 0.2 + 1.3 * t
        means.append(torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1))
        classes += [c] * per_class
    return ClassMixture(torch.cat(means), std, classes)


def one_hot(classes, num_classes):
    return torch.nn.functional.one_hot(classes, num_classes).to(torch.float64)


# ----------------------------------------------------------------------------
# Measuring samples against the true class distribution.

def mean_distance(x, y):
    """E|X - Y| over all pairs of points of x and y."""
    return float(torch.cdist(x, y).mean())


def energy_distance(x, y):
    """Energy distance of the two samples' empirical distributions (Szekely & Rizzo):
    2 E|X - Y| - E|X - X'| - E|Y - Y'| >= 0, zero only when they are the same distribution."""
    return 2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def evaluate(mix, samples, classes, reference, off_threshold):
    """Per-class scores averaged over classes: mean log p(x | c), share with log p below
    `off_threshold`, energy distance to `reference` samples of the class, and diversity =
    mean pairwise distance relative to the reference's."""
    log_p = mix.log_density(samples, one_hot(classes, mix.label_dim))
    distance, diversity = [], []
    for c in range(mix.label_dim):
        x, y = samples[classes == c], reference[classes == c]
        distance.append(energy_distance(x, y))
        diversity.append(mean_distance(x, x) / mean_distance(y, y))
    return dict(log_p=float(log_p.mean()), off=float((log_p < off_threshold).double().mean()),
                distance=sum(distance) / len(distance), diversity=sum(diversity) / len(diversity))


# ----------------------------------------------------------------------------
# Demo.

WEIGHTS = (1, 1.5, 2, 3, 5)
GUIDE_WIDENING = 2.0          # autoguidance's guide: the main model with every component twice as wide
BLURRY_MAIN = 1.5             # the second setting's main model: components 1.5x too wide, as a real network's


def methods(main, interval):
    """name -> (w -> guided denoiser) for the three kinds of guidance compared."""
    bad = main.widened(GUIDE_WIDENING)
    return {
        "CFG": lambda w: guided(main, w),
        "autoguidance": lambda w: guided(main, w, guide_net=bad),
        f"CFG on [{interval[0]:g}, {interval[1]:g}]": lambda w: guided(main, w, interval=interval),
    }


def run_setting(truth, main, latents, classes, reference, off_threshold, interval, steps, device):
    """Sample every method at every w; returns {method: {w: (samples, scores)}}."""
    sample = common.load("04_stochastic_sampler").make_sampler(steps)
    labels = one_hot(classes, truth.label_dim).to(device)
    results, unguided = {}, None
    for name, make in methods(main, interval).items():
        results[name] = {}
        for w in WEIGHTS:
            if w == 1 and unguided is not None:      # w = 1 is D_main exactly: one run serves every method
                results[name][w] = unguided
                continue
            x = sample(make(w), latents, {"class_labels": labels}).cpu()
            results[name][w] = (x, evaluate(truth, x, classes, reference, off_threshold))
            if w == 1:
                unguided = results[name][w]
    return results


def print_table(title, results, floor):
    print(f"\n{title}")
    print(f"{'method':<18}{'w':>5}{'mean log p':>12}{'off data':>10}{'energy dist':>13}{'diversity':>11}")
    for name, per_w in results.items():
        for w, (_, s) in per_w.items():
            print(f"{name:<18}{w:>5g}{s['log_p']:>12.3f}{100 * s['off']:>9.1f}%{s['distance']:>13.4f}"
                  f"{s['diversity']:>11.3f}")
    print(f"{'(true samples)':<18}{'':>5}{floor['log_p']:>12.3f}{100 * floor['off']:>9.1f}%{floor['distance']:>13.4f}"
          f"{floor['diversity']:>11.3f}")


EXTENT = 1.8                  # the figures show [-1.8, 1.8]^2


def density_image(truth, size=240):
    """p(x) (all classes) on a size x size grid over the figures' square."""
    grid = torch.linspace(-EXTENT, EXTENT, size, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    return truth.log_density(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(gx.shape)


def plot_samples(density, results, classes, columns, title, file):
    import matplotlib.pyplot as plt
    rows = list(results)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.1 * len(columns), 3.2 * len(rows)),
                             sharex=True, sharey=True)
    colours = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    for i, name in enumerate(rows):
        for j, w in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(density.sqrt().numpy(), extent=(-EXTENT, EXTENT, -EXTENT, EXTENT), origin="lower", cmap="Greys")
            x, scores = results[name][w]
            for c in range(int(classes.max()) + 1):
                pts = x[classes == c][:400]
                ax.scatter(pts[:, 0], pts[:, 1], s=1.5, color=colours[c % len(colours)], lw=0)
            ax.set_title(f"{name}, w = {w:g}\n{100 * scores['off']:.1f}% off data, diversity "
                         f"{scores['diversity']:.2f}", fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("x_1")
            if j == 0:
                ax.set_ylabel("x_2")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_metrics(settings, floor, file):
    import matplotlib.pyplot as plt
    keys = [("log_p", "mean log p(x | c) of samples"), ("off", "% of samples off the data"),
            ("distance", "energy distance to the class"), ("diversity", "diversity (1 = the data's)")]
    fig, axes = plt.subplots(len(settings), len(keys), figsize=(3.4 * len(keys), 3.0 * len(settings)))
    for i, (setting, results) in enumerate(settings.items()):
        for j, (key, label) in enumerate(keys):
            ax = axes[i, j]
            scale = 100 if key == "off" else 1        # the share off the data in percent
            for name, per_w in results.items():
                ax.plot(WEIGHTS, [scale * per_w[w][1][key] for w in WEIGHTS], "o-", ms=3, label=name)
            ax.axhline(scale * floor[key], color="0.5", ls="--", lw=1, label="true samples")
            ax.set_xlabel("guidance weight w")
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(setting, fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Past w = 1.5, CFG leaves the data and loses diversity; autoguidance stays on the data", fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--samples", type=common.number(int, low=10), default=1000,
                        help="samples per class and configuration (default: 1000)")
    parser.add_argument("--steps", type=common.number(int, low=2), default=32,
                        help="steps of 04's Algorithm 2, deterministic (default: 32)")
    parser.add_argument("--interval", type=common.number_list(float, 0), default="0.05,0.5",
                        help="sigma interval LO,HI for the interval-limited CFG (default: 0.05,0.5)")
    net = parser.add_argument_group("on a trained network (instead of the 2-D toy; --samples, --interval unused)")
    net.add_argument("--network", metavar="SNAPSHOT", help="a 07 snapshot (best trained with --label-dropout) or "
                     "an official .pkl: writes network_grid.png, the same seeds at w = 1, 1.5, 2, 3 under CFG")
    net.add_argument("--guide-network", metavar="SNAPSHOT", help="an earlier snapshot of the same run: adds the "
                     "rows of autoguidance by it")
    net.add_argument("--seeds", type=common.number_list(int, 0, ranges=True), default="0-7",
                     help="the grid's columns, e.g. 0-7 or 3,5,9; column j is "
                     "conditioned on class j mod the number of classes (default: 0-7)")
    net.add_argument("--network-steps", metavar="N", type=common.number(int, low=2), default=18,
                     help="steps of 04's Algorithm 2 for the network grid (default: 18 = 35 NFE, as the paper)")
    return parser.parse_args(argv)


def main(argv=None):
    common.run(demo, parse_args(argv))


def demo(args):
    interval = interval_of(args.interval)
    device = common.get_device(args.device)
    if args.network is None and args.guide_network is not None:
        raise ValueError("--guide-network guides --network; give both")
    if args.network is not None:
        network_grid(args, device)
    else:
        spiral_demo(args, interval, device)


def spiral_demo(args, interval, device):
    torch.set_num_threads(1)    # [N, K] tensors of a 2-D toy: threads only add contention
    outdir = common.out_dir(__file__, args.outdir)
    start = time.time()
    truth = spiral_mixture()
    C = truth.label_dim
    g = torch.Generator().manual_seed(args.seed)
    classes = torch.arange(C).repeat_interleave(args.samples)
    latents = torch.randn(len(classes), 2, generator=g, dtype=torch.float64).to(device)
    reference = truth.sample(classes, g)                  # what the distances compare against
    data = truth.sample(classes, g)                       # independent true samples: the noise floor
    data_log_p = truth.log_density(data, one_hot(classes, C))
    off_threshold = torch.quantile(data_log_p, 0.01)      # "off the data": below the data's 1st percentile
    floor = evaluate(truth, data, classes, reference, off_threshold)

    settings = {
        "main = the exact mixture": truth,
        f"main = blurry (components {BLURRY_MAIN:g}x too wide)": truth.widened(BLURRY_MAIN),
    }
    print(f"Three spiral arms of {len(truth.means) // C} Gaussians (width {float(truth.stds[0]):g}), "
          f"{args.samples} samples per class, 04's Algorithm 2 with {args.steps} Heun steps (S_churn = 0).")
    print(f"Autoguidance's guide: the main model with every component {GUIDE_WIDENING:g}x as wide. "
          f"Off data: log p(x | c) below {float(off_threshold):.2f}, the 1st percentile of true samples.")
    print(f"True samples against the reference (the noise floor): energy distance {floor['distance']:.4f}, "
          f"diversity {floor['diversity']:.3f}")
    all_results = {}
    for setting, main in settings.items():
        results = run_setting(truth, main, latents, classes, reference, off_threshold, interval, args.steps, device)
        print_table(f"Setting: {setting}", results, floor)
        all_results[setting] = results

    # Why the interval: CFG at w = 3 applied in one band of sigma only (exact main model). The interval runs from
    # about the components' width (below it the arms are already told apart) to the gap between neighbouring arms,
    # 0.54 (above it a noisy point cannot tell which arm it belongs to): guiding above it does CFG's damage (which
    # part of its class a sample ends in), below it nothing, in between the good.
    bands = [(0.0, interval[0]), interval, (interval[1], math.inf)]
    sample = common.load("04_stochastic_sampler").make_sampler(args.steps)
    labels = one_hot(classes, C).to(device)
    print(f"\nWhere in sigma CFG helps and where it hurts: w = 3, guidance only for sigma in one band (exact main)")
    print(f"{'band':<18}{'mean log p':>12}{'off data':>10}{'energy dist':>13}{'diversity':>11}")
    for lo, hi in bands:
        x = sample(guided(truth, 3, interval=(lo, hi)), latents, {"class_labels": labels}).cpu()
        s = evaluate(truth, x, classes, reference, off_threshold)
        print(f"{f'[{lo:g}, {hi:g}]':<18}{s['log_p']:>12.3f}{100 * s['off']:>9.1f}%{s['distance']:>13.4f}"
              f"{s['diversity']:>11.3f}")

    names = list(settings)
    density = density_image(truth)
    plot_samples(density, all_results[names[0]], classes, (1, 2, 3, 5),
                 "Exact main model: CFG pushes samples to the outer ends of the arms and off them; autoguidance "
                 "keeps them on the data", f"{outdir}/samples.png")
    plot_samples(density, all_results[names[1]], classes, (1, 2, 3, 5),
                 f"Blurry main model ({BLURRY_MAIN:g}x): autoguidance puts its stray samples back on the arms",
                 f"{outdir}/samples_blurry_main.png")
    plot_metrics(all_results, floor, f"{outdir}/metrics.png")
    print_conclusion(all_results)
    print(f"\nfigures in {outdir}/  ({time.time() - start:.0f} s)")
    print(WHAT_THIS_SHOWS)


def print_conclusion(all_results):
    """From w = 1 to the largest w, per setting and method; and which method keeps samples on the data."""
    first, last = WEIGHTS[0], WEIGHTS[-1]
    for setting, results in all_results.items():
        print(f"\n{setting}: from w = {first:g} to w = {last:g}")
        for name, per_w in results.items():
            a, b = per_w[first][1], per_w[last][1]
            print(f"  {name:<18} off data {100 * a['off']:.1f}% -> {100 * b['off']:.1f}%, mean log p "
                  f"{a['log_p']:.2f} -> {b['log_p']:.2f}, energy distance {a['distance']:.4f} -> "
                  f"{b['distance']:.4f}, diversity {a['diversity']:.2f} -> {b['diversity']:.2f}")
        ranked = sorted(results, key=lambda name: results[name][last][1]["off"])
        print(f"  fewest samples off the data at w = {last:g}: " +
              ", then ".join(f"{name} ({100 * results[name][last][1]['off']:.1f}%)" for name in ranked))


WHAT_THIS_SHOWS = """
What this shows (samples.png and samples_blurry_main.png: rows CFG, autoguidance, CFG on the interval; metrics.png)
  * CFG sharpens a class by pushing it away from the other classes: towards the outer end of its arm and, as w
    grows, off it (diversity falls). A blurry main model's stray samples it first puts back (w = 1.5), then
    scatters more of them the harder it guides.
  * Autoguidance extrapolates away from a weaker model of the same class, whose errors point off the data: every
    arm stays on the data along its whole length, and the blurry model's stray samples go back onto it.
  * CFG only on the sigma interval, where the classes are being told apart, stays close to w = 1 (the band
    table: guiding above the interval does almost all of CFG's damage).
"""


# ----------------------------------------------------------------------------
# The same on a trained network: one grid of the same seeds at growing w.

GRID_WEIGHTS = (1, 1.5, 2, 3)


def network_grid(args, device):
    """Write network_grid.png: unguided, then CFG (class-conditional networks) and autoguidance (with
    --guide-network) at w = 1.5, 2, 3; columns are the seeds, column j conditioned on class j mod label_dim.
    Returns the rows, {label: uint8 images [N, C, H, W]}."""
    torch.set_num_threads(1)    # a 16x16 network one seed group at a time: threads only add contention
    ch08 = common.load("08_evaluate_fid")   # demo only: 08's network loader and seed-only generation
    seeds = args.seeds
    net = ch08.load_net(args.network, device)
    guide = None if args.guide_network is None else ch08.load_net(args.guide_network, device)
    methods = ([("CFG", None)] if net.label_dim else []) + ([("autoguidance", guide)] if guide is not None else [])
    if not methods:
        raise ValueError(f"{args.network} is unconditional: CFG needs a class-conditional network "
                         f"(07 --cond --label-dropout p); give --guide-network for autoguidance")
    warning = label_dropout_warning(net) if net.label_dim else None    # only CFG uses the zero class
    if warning:
        print(warning, file=sys.stderr)
    classes = [j % max(net.label_dim, 1) for j in range(len(seeds))]
    sample = common.load("04_stochastic_sampler").make_sampler(args.network_steps)

    def row(denoiser):
        """uint8 [N, C, H, W]: the seeds, each with its column's class, through Algorithm 2."""
        images = [None] * len(seeds)
        for c in sorted(set(classes)):
            columns = [j for j in range(len(seeds)) if classes[j] == c]
            batch = ch08.generate_batch(denoiser, [seeds[j] for j in columns], device, sample,
                                              c if net.label_dim else None)
            for j, image in zip(columns, batch):
                images[j] = image
        return torch.stack(images)

    start = time.time()
    rows = {"unguided (w = 1)": row(net)}         # w = 1 is D_main exactly, for every method
    for name, guide_net in methods:
        for w in GRID_WEIGHTS[1:]:
            rows[f"{name}, w = {w:g}"] = row(guided(net, w, guide_net))
    names = class_names(args.network, net.label_dim)
    column_labels = [f"seed {s}" + (f"\n{names[c]}" if net.label_dim else "") for s, c in zip(seeds, classes)]
    title = f"Guidance on {snapshot_name(args.network)}" + \
        (f", autoguided by {snapshot_name(args.guide_network)}" if guide is not None else "")
    path = f"{common.out_dir(__file__, args.outdir)}/network_grid.png"
    common.load("07_train_cifar10").save_grid(torch.cat(list(rows.values())), path, title, list(rows), len(seeds),
                                                column_labels=column_labels)
    print(f"{len(seeds)} seeds x {len(rows)} rows, 04's Algorithm 2 with {args.network_steps} steps "
          f"({time.time() - start:.0f} s). How far each row moves from the unguided images, and its contrast:")
    print(f"{'row':<24}{'RMS change (of 255)':>21}{'pixel std':>11}")
    unguided = rows["unguided (w = 1)"].double()
    for label, images in rows.items():
        change = (images.double() - unguided).square().mean().sqrt()
        print(f"{label:<24}{float(change):>21.1f}{float(images.double().std()):>11.1f}")
    print(f"\nWhat this shows ({path}: columns the same seeds, each with its class; rows growing w)\n"
          f"  CFG pushes each image towards what sets its class apart from the others (colour, shading); autoguidance\n"
          f"  removes what the earlier, weaker snapshot gets wrong (blur, haze), and overshoots at large w. A 16x16\n"
          f"  network trained for minutes shows the mechanics, not FID-level quality.")
    return rows


def snapshot_name(path):
    """'network-snapshot-000064.pt' -> 'the 64 kimg snapshot' (07's snapshots), else the file name."""
    m = re.fullmatch(r"network-snapshot-(\d+)\.(pt|pkl)", os.path.basename(path))
    return f"the {int(m.group(1))} kimg snapshot" if m else os.path.basename(path)


def class_names(path, label_dim):
    """The class names a 07 run recorded beside the snapshot (its training_options.json), else 'class c'."""
    names = common.load("07_train_cifar10").read_run_options(os.path.dirname(os.path.abspath(path))).get("class_names")
    return names if names and len(names) == label_dim else [f"class {c}" for c in range(label_dim)]


if __name__ == "__main__":
    main()
