"""11 -- Beyond the paper: choose the EMA length after training (EDM2's post-hoc EMA).

EDM samples an exponential moving average (EMA) of the weights, and Table 7 fixes its length per data set,
found by training once per candidate. EDM2 (Karras et al., CVPR 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Sec. 3 and App. C; equation numbers are that appendix's) trains once, keeps
two power-function EMAs, snapshots them now and then, and afterwards combines the snapshots into the EMA of
ANY width -- even that of a run stopped earlier:
  * the profile p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (Sec. 3.1), its width
    sigma_rel (Eq. 123, 126) and the per-step decay beta_t (Eq. 127) that `07 --phema` runs while training;
  * least squares over the profiles' closed-form inner products (Eq. 151, Algorithm 3): the coefficients of
    the snapshots, which are then summed as plain tensor files (no network code needed).

Run:  python 11_post_hoc_ema.py     (the demo: a 1-D toy with known answers, and a short 07 run)
After `python 07_train_cifar10.py --preset tiny --phema 0.05,0.10 --outdir out/11_tiny`:
  python 11_post_hoc_ema.py --run out/11_tiny --sigma-rel 0.07 --out out/11_tiny/ema-0.07.pt
  python 08_evaluate_fid.py generate --network out/11_tiny/ema-0.07.pt --seeds 0-63
(--at-kimg K: the average of a run stopped at K kimg; --from 0.05,0.10: which stored profiles to use.)
"""

import contextlib
import copy
import glob
import math
import os
import re
import time
from typing import NamedTuple

import numpy as np
import torch

import common


# ----------------------------------------------------------------------------
# The power-function EMA (Sec. 3.1): at time t the weights theta(tau) of each earlier time count with a power
# of tau. Its shape is the same at every t, stretched over [0, t]: a RELATIVE length, one value for any run.

def profile(tau, t, gamma):
    """The density p_{t,gamma} at times tau (0 beyond t): how much theta(tau) counts in the average at t."""
    tau = np.asarray(tau, np.float64)
    return np.where(tau <= t, (gamma + 1) / t * (np.clip(tau, 0, t) / t) ** gamma, 0.0)


def profile_mass(t, gamma, a, b):
    """integral of p_{t,gamma} over [a, b]: (min(b, t)/t)^(gamma+1) - (min(a, t)/t)^(gamma+1). With a, b the
    ends of step tau, the weight that the update of Eq. 127 (phema_beta) gives step tau after t steps."""
    cdf = lambda x: (np.clip(np.asarray(x, np.float64), 0, t) / t) ** (gamma + 1)
    return cdf(b) - cdf(a)


PHEMA_SIGMA_REL_MAX = 1 / math.sqrt(12)   # gamma = 0: the plain average of all weights, the widest profile


def phema_sigma_rel(gamma):
    """Width of the profile tau^gamma on [0, t], as its standard deviation over t (Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def phema_gamma(sigma_rel):
    """The exponent gamma >= 0 of relative width sigma_rel: Eq. 123 solved for gamma, i.e. the largest real root
    of the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2 (Eq. 126). EDM2
    stores sigma_rel 0.05 (gamma 16.97) and 0.10 (gamma 6.94)."""
    if not 0 < sigma_rel <= PHEMA_SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {PHEMA_SIGMA_REL_MAX:.4f}] (1/sqrt(12): the plain average), "
                         f"got {sigma_rel:g}")
    s = sigma_rel ** -2
    return max(0.0, float(max(r.real for r in np.roots([1, 7, 16 - s, 12 - s]) if abs(r.imag) < 1e-9)))


def phema_beta(t, gamma):
    """Per-step decay after optimizer step t = 1, 2, ... (Eq. 127): beta_t = (1 - 1/t)^(gamma + 1), applied as
    an ordinary EMA update (07's update_ema). Step 1 copies the weights (beta = 0); after t steps step tau holds
    weight (tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1), exactly the profile's mass on (tau - 1, tau]
    (profile_mass): the discrete average IS the continuous one of the piecewise-constant trajectory."""
    return (1 - 1 / t) ** (gamma + 1)


def inner_product(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral of p_{t_a,gamma_a} p_{t_b,gamma_b} over tau, in closed form (Eq. 151):
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) m^(gamma_a + gamma_b + 1) / (t_a^(gamma_a + 1)
    t_b^(gamma_b + 1)) with m = min(t_a, t_b)."""
    # Written with ratios <= 1: m^gamma alone overflows for long runs (t ~ 1e8 images, gamma ~ 100).
    m = min(t_a, t_b)
    scale = (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * scale


def gram(profiles_a, profiles_b):
    """Matrix of inner products between two lists of profiles (t, gamma)."""
    return np.array([[inner_product(*a, *b) for b in profiles_b] for a in profiles_a])


# ----------------------------------------------------------------------------
# Reconstruction (App. C, Algorithm 3). Snapshot i, taken at time t_i of the profile gamma_i, is
# theta_hat_i = <p_i, theta>; a combination sum_i c_i theta_hat_i = <q, theta> is the trajectory averaged with
# the profile q = sum_i c_i p_i. Choose c to bring q as close as possible (in L2 over tau) to the target
# p_{t_r, gamma_r}, for any gamma_r and any t_r up to the last snapshot (later snapshots are left out: as if
# training had stopped at t_r).

def solve_coefficients(stored, target):
    """Coefficients c (sum 1) minimizing ||sum_i c_i p_i - p_target|| over the stored profiles [(t_i, gamma_i)],
    and that minimum relative to ||p_target||. Normal equations G c = b with the constraint sum c = 1 added
    through a Lagrange multiplier: [[G, 1], [1^T, 0]] [c, lambda] = [b, 1]."""
    # Total weight 1: an average of the weights, not a rescaled one (EDM2 rescales the unconstrained solution
    # instead; with a good fit both are close).
    n = len(stored)
    if n == 0:
        raise ValueError("no snapshots to reconstruct from")
    system = np.ones((n + 1, n + 1))
    system[:n, :n], system[n, n] = gram(stored, stored), 0
    rhs = np.append(gram(stored, [target])[:, 0], 1.0)
    # lstsq, not solve: two snapshots of one profile at one time make G singular, and any split of their
    # weight is then as good as any other.
    coefficients = np.linalg.lstsq(system, rhs, rcond=None)[0][:n]
    return coefficients, profile_error(stored, coefficients, target)


def profile_error(stored, coefficients, target):
    """||sum_i c_i p_i - p_target|| / ||p_target||, exactly: c^T G c - 2 c^T b + <p_target, p_target>."""
    # Why this is the number to watch: theta_rec - theta_target = <q - p, theta> = <q - p, theta - theta_bar>
    # for any constant theta_bar (both profiles have mass 1), so by Cauchy-Schwarz
    # |theta_rec - theta_target| <= ||q - p|| ||theta - theta_bar||: the profile error times how far the
    # trajectory moves. Snapshots far apart cannot make a profile narrower than their spacing.
    c = np.asarray(coefficients, np.float64)
    squared = c @ gram(stored, stored) @ c - 2 * c @ gram(stored, [target])[:, 0] + inner_product(*target, *target)
    return math.sqrt(max(squared, 0.0) / inner_product(*target, *target))


# ----------------------------------------------------------------------------
# The snapshots of a run, read as data: torch.save dicts {"format", "class_name", "kwargs", "state_dict"}
# (06's save_network writes them, 08 generates from them), so reconstruction needs no network code.

def phema_path(run_dir, sigma_rel, cur_nimg):
    """<run>/phema-<sigma_rel>-<kimg>.pt, kimg to the image (000016.000): the snapshot 07 --phema writes of one
    profile, its time exact in the name (--snap may be under 1 kimg)."""
    return os.path.join(run_dir, f"phema-{sigma_rel:g}-{cur_nimg / 1000:010.3f}.pt")


SNAPSHOT_NAME = re.compile(r"phema-(?P<sigma_rel>[0-9.e+-]+)-(?P<kimg>\d+\.\d{3})\.pt")   # phema_path's names


class Snapshot(NamedTuple):
    path: str
    sigma_rel: float
    nimg: int          # the images trained on when it was taken: its time t

    @property
    def profile(self):
        return self.nimg, phema_gamma(self.sigma_rel)


def find_snapshots(run_dir):
    """The phema-*.pt snapshots that 07 --phema wrote into `run_dir`, by time."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run {run_dir!r}: no such folder (a 07 run folder, trained with --phema)")
    found = []
    for path in glob.glob(os.path.join(run_dir, "phema-*.pt")):
        m = SNAPSHOT_NAME.fullmatch(os.path.basename(path))
        if m:
            found.append(Snapshot(path, float(m["sigma_rel"]), round(float(m["kimg"]) * 1000)))
    if not found:
        raise ValueError(f"{run_dir!r} holds no phema-<sigma_rel>-<kimg>.pt snapshots; train with "
                         f"07_train_cifar10.py --phema 0.05,0.10")
    return sorted(found, key=lambda s: (s.nimg, s.sigma_rel))


def select(snapshots, at_nimg=None, from_sigma_rel=None):
    """The snapshots to combine for a target at `at_nimg` (default: the last one): those taken up to then, of
    the profiles in `from_sigma_rel` (default: all stored). Returns (snapshots, at_nimg)."""
    stored = sorted({s.sigma_rel for s in snapshots})
    if from_sigma_rel is not None:
        missing = [s for s in from_sigma_rel if s not in stored]
        if missing:
            raise ValueError(f"--from {','.join(f'{s:g}' for s in missing)}: the run stores only sigma_rel "
                             f"{','.join(f'{s:g}' for s in stored)}")
        snapshots = [s for s in snapshots if s.sigma_rel in from_sigma_rel]
    last = max(s.nimg for s in snapshots)
    at_nimg = last if at_nimg is None else at_nimg
    if not 0 < at_nimg <= last:
        raise ValueError(f"--at-kimg {at_nimg / 1e3:g}: must be after 0 and at most the last snapshot, "
                         f"{last / 1e3:g} kimg")
    return [s for s in snapshots if s.nimg <= at_nimg], at_nimg


def combine(paths, coefficients):
    """The snapshot whose tensors are sum_i c_i (tensors of snapshot i), summed in float64 one file at a time: the
    first file's dict with the combined state_dict (in the files' dtypes)."""
    first, total = None, None
    for path, c in zip(paths, coefficients):
        try:
            snapshot = torch.load(path, map_location="cpu", weights_only=True)
            state = snapshot["state_dict"]
        except Exception as error:   # truncated, not a torch.save file, not a snapshot: many kinds
            raise ValueError(f"cannot read {path} as a network snapshot ({type(error).__name__})") from None
        if first is None:
            first, total = snapshot, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
        if state.keys() != total.keys() or any(v.shape != total[k].shape for k, v in state.items()):
            raise ValueError(f"{path} holds another network than {paths[0]}: snapshots of one run only")
        for k, v in state.items():
            total[k] += float(c) * v.to(torch.float64)
    return dict(first, state_dict={k: v.to(first["state_dict"][k].dtype) for k, v in total.items()})


def reconstruct(run_dir, sigma_rel, at_kimg=None, from_sigma_rel=None):
    """The power-function EMA of width sigma_rel at `at_kimg` (default: the run's last snapshot) from the run's
    snapshots. Returns (snapshot dict, snapshots used, coefficients, relative profile error)."""
    gamma = phema_gamma(sigma_rel)
    used, at_nimg = select(find_snapshots(run_dir), None if at_kimg is None else round(at_kimg * 1000),
                           from_sigma_rel)
    coefficients, error = solve_coefficients([s.profile for s in used], (at_nimg, gamma))
    return combine([s.path for s in used], coefficients), used, coefficients, error


def command_line(args):
    """--run: reconstruct, print the coefficients and the profile error, write the snapshot (atomically)."""
    if args.out is None:
        raise ValueError("--run needs --out FILE, where the reconstructed snapshot goes")
    snapshot, used, coefficients, error = reconstruct(args.run, args.sigma_rel, args.at_kimg, args.from_ or None)
    at = max(s.nimg for s in used) if args.at_kimg is None else round(args.at_kimg * 1000)
    print(f"sigma_rel {args.sigma_rel:g} (gamma {phema_gamma(args.sigma_rel):.3f}) at {at / 1e3:g} kimg "
          f"from {len(used)} snapshots:")
    print(f"{'snapshot':<32}{'sigma_rel':>10}{'kimg':>10}{'coefficient':>14}")
    for s, c in zip(used, coefficients):
        print(f"{os.path.basename(s.path):<32}{s.sigma_rel:>10g}{s.nimg / 1e3:>10g}{c:>14.6f}")
    print(f"sum of coefficients {coefficients.sum():.6f}; relative profile error ||q - p|| / ||p|| = {error:.2e}")
    with common.atomic_open(args.out) as f:
        torch.save(snapshot, f)
    print(f"wrote {args.out}; images: python 08_evaluate_fid.py generate --network {args.out}")


# ----------------------------------------------------------------------------
# Demo (a): chapter 01's 1-D toy, where the data distribution is known exactly.

class Tracker:
    """Watches every optimizer step of a run (a global step hook, so 01's train_toy runs unchanged) and, as
    07 --phema does, updates a power EMA per width in `tracked` (`update_ema` with phema_beta), snapshots the
    `stored` widths every `every` steps, keeps the widths of `tracked` at the steps in `keep`, and sums
    theta and |theta|^2 over the steps (the trajectory's spread, for the error bound)."""

    def __init__(self, net, stored, tracked, every, keep, update_ema):
        self.net, self.stored, self.every, self.keep, self.t = net, stored, every, set(keep), 0
        self.update_ema = update_ema
        self.gamma = {s: phema_gamma(s) for s in sorted(set(stored) | set(tracked))}
        self.averages = {s: copy.deepcopy(net).requires_grad_(False) for s in self.gamma}
        self.snapshots = []                           # (t, sigma_rel, weights)
        self.kept = {}                                # (t, sigma_rel) -> weights
        self.sum, self.sum_squares = None, 0.0

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        self.hook = register_optimizer_step_post_hook(lambda *_: self.step())
        return self

    def __exit__(self, *_):
        self.hook.remove()

    def step(self):
        self.t += 1
        for s, average in self.averages.items():
            self.update_ema(average, self.net, phema_beta(self.t, self.gamma[s]))
        theta = flat(self.net)
        self.sum = theta.clone() if self.sum is None else self.sum + theta
        self.sum_squares += float(theta @ theta)
        if self.t % self.every == 0:
            self.snapshots += [(self.t, s, flat(self.averages[s])) for s in self.stored]
        if self.t in self.keep:
            self.kept.update({(self.t, s): flat(average) for s, average in self.averages.items()})

    def spread(self):
        """sqrt(sum_tau |theta_tau - theta_bar|^2), theta_bar the mean: ||theta - theta_bar|| with unit steps."""
        return math.sqrt(max(self.sum_squares - float(self.sum @ self.sum) / self.t, 0.0))


def flat(module):
    return torch.cat([p.detach().flatten().to(torch.float64) for p in module.parameters()])


def with_weights(net, weights):
    """A copy of `net` with the flat float64 vector `weights` as its parameters."""
    clone = copy.deepcopy(net)
    torch.nn.utils.vector_to_parameters(weights.to(torch.float32), clone.parameters())
    return clone.eval()


def w1_to_mixture(samples, mix, points=20001):
    """Wasserstein-1 distance between the samples and the exact mixture: integral |F_n(x) - F(x)| dx, F the
    mixture's CDF in closed form (a fine grid over both supports)."""
    x = torch.as_tensor(samples, dtype=torch.float64).flatten().sort().values
    lo = min(float(x[0]), float((mix.means - 6 * mix.stds).min()))
    hi = max(float(x[-1]), float((mix.means + 6 * mix.stds).max()))
    grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    exact = (mix.weights * 0.5 * (1 + torch.erf((grid[:, None] - mix.means) / (mix.stds * math.sqrt(2))))).sum(1)
    empirical = torch.searchsorted(x, grid, right=True) / len(x)
    return float(((empirical - exact).abs()[:-1] * grid.diff()).sum())


def reconstruct_weights(snapshots, sigma_rel, t, every=1):
    """sum_i c_i snapshot_i for the width sigma_rel at step t, from the toy's snapshots (t_i, sigma_rel_i,
    weights) taken up to t, every `every`-th of them in time; returns (weights, coefficients, profile error)."""
    times = sorted({ti for ti, _, _ in snapshots if ti <= t})
    kept = set(times[::-1][::every])                 # every `every`-th, counted back from the last
    used = [(ti, si, w) for ti, si, w in snapshots if ti in kept]
    c, error = solve_coefficients([(ti, phema_gamma(si)) for ti, si, _ in used], (t, phema_gamma(sigma_rel)))
    return sum(float(ci) * w for ci, (_, _, w) in zip(c, used)), c, error, used


TRACKED = (0.01, 0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25)
STORED = (0.05, 0.10)


def toy_run(args, device, log):
    """01's ToyMLP in 05's EDM preconditioning, trained by 01's train_toy with the tracker; W1 (04's Algorithm 2
    samples against the exact data distribution) of the final weights, the tracked and the reconstructed EMAs,
    at the end of training and half-way through."""
    ch01, ch05, ch07 = (common.load(name) for name in ("01_toy_1d", "05_preconditioning", "07_train_cifar10"))
    sample = common.load("04_stochastic_sampler").make_sampler(args.sampler_steps)
    mix = ch01.default_mixture()
    sigma_data = float(mix.sample(100000, torch.Generator().manual_seed(1)).std())
    torch.manual_seed(args.seed)
    net = ch05.EDMPrecond(ch01.ToyMLP(), 1, 1, sigma_data=sigma_data)
    middle = args.toy_steps // 2
    tracker = Tracker(net, STORED, TRACKED, args.snapshot_every, (middle, args.toy_steps), ch07.update_ema)
    start = time.time()
    with tracker:
        ch01.train_toy(net, mix, ch05.EDMLoss(sigma_data=sigma_data), args.toy_steps, 512, 2e-3, args.seed, device)
    log(f"(a) trained chapter 01's ToyMLP (EDM preconditioning) for {args.toy_steps} steps with {len(TRACKED)} power "
        f"EMAs tracked and sigma_rel {', '.join(map(str, STORED))} snapshotted every {args.snapshot_every} steps "
        f"({time.time() - start:.1f} s)")
    latents = torch.randn(args.samples, 1, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)

    @torch.no_grad()
    def w1(weights):
        samples = sample(with_weights(net, weights), latents.to(device))
        return w1_to_mixture(samples.cpu(), mix)
    results = {"floor": w1_to_mixture(mix.sample(args.samples, torch.Generator().manual_seed(2)), mix)}
    for t in (middle, args.toy_steps):
        rows = []
        for s in TRACKED:
            weights, _, error, _ = reconstruct_weights(tracker.snapshots, s, t)
            tracked = tracker.kept[(t, s)]
            rows.append(dict(sigma_rel=s, tracked=w1(tracked), reconstructed=w1(weights), profile_error=error,
                             weight_error=float((weights - tracked).norm() / tracked.norm())))
        results[t] = rows
    results["final"] = w1(flat(net))
    return results, tracker, net


def print_toy(results, args):
    print(f"\n(a) W1 to the exact data distribution, {args.samples} samples, 04's Algorithm 2 with "
          f"{args.sampler_steps} steps, same latents for every row (two draws of the data: "
          f"W1 {results['floor']:.4f} -- the noise floor)")
    for t in (args.toy_steps // 2, args.toy_steps):
        print(f"  EMAs at step {t} of {args.toy_steps}" + " (half-way: as if training had stopped there)" *
              (t < args.toy_steps))
        print(f"  {'sigma_rel':>10}{'W1 tracked':>12}{'W1 reconstr.':>14}{'profile err':>13}{'weight err':>12}")
        for r in results[t]:
            print(f"  {r['sigma_rel']:>10g}{r['tracked']:>12.4f}{r['reconstructed']:>14.4f}{r['profile_error']:>13.2e}"
                  f"{r['weight_error']:>12.2e}")
    print(f"  the raw weights after the last step (no EMA): W1 {results['final']:.4f}")


# ----------------------------------------------------------------------------
# Demo (b): how many snapshots.

def snapshot_count_study(tracker, targets=(0.02, 0.07, 0.20)):
    """For targets at the last step: profile error and weight error (against the tracked EMA) when only every
    k-th snapshot time is kept. Returns {target: [(snapshots per profile, profile error, weight error, bound)]}."""
    t = tracker.t
    times = sorted({ti for ti, _, _ in tracker.snapshots})
    out = {}
    for target in targets:
        tracked = tracker.kept[(t, target)]
        rows = []
        for every in (len(times), 8, 4, 2, 1):
            weights, c, error, used = reconstruct_weights(tracker.snapshots, target, t, every)
            # profile_error's bound ||q - p|| ||theta - theta_bar||, with unit steps (the relative error times ||p||)
            bound = error * math.sqrt(inner_product(t, phema_gamma(target), t, phema_gamma(target))) * tracker.spread()
            rows.append((len(used) // len(tracker.stored), error, float((weights - tracked).norm() / tracked.norm()),
                         bound / float(tracked.norm())))
        out[target] = rows
    return out


def print_study(study):
    print("\n(b) reconstruction at the last step vs snapshots kept (evenly spaced, ending at the last step)")
    print(f"  {'target':>8}{'snapshots/profile':>19}{'profile err':>13}{'weight err':>12}{'bound':>10}")
    for target, rows in study.items():
        for n, error, weight_error, bound in rows:
            print(f"  {target:>8g}{n:>19d}{error:>13.2e}{weight_error:>12.2e}{bound:>10.2e}")
    print("  weight err = |theta_rec - theta_tracked| / |theta_tracked|; bound = profile error x the trajectory's "
          "spread (profile_error), same scale")


# ----------------------------------------------------------------------------
# Demo (c): a 07 run.

def flat_state(state_dict):
    """A state dict's tensors as one float64 vector (in its order)."""
    return torch.cat([v.flatten().to(torch.float64) for v in state_dict.values()])


def tiny_run(args, device, outdir):
    """07 --preset tiny at reduced length with --phema 0.05,0.07,0.1; 0.07 reconstructed from 0.05 and 0.1."""
    ch07 = common.load("07_train_cifar10")
    run_dir = os.path.join(outdir, "tiny-run")
    log = os.path.join(run_dir, "log.txt")
    print(f"\n(c) 07 --preset tiny for {args.tiny_kimg:g} kimg with --phema 0.05,0.07,0.1, snapshots every "
          f"{args.tiny_snap:g} kimg into {run_dir} (--resume auto: a finished run there is reused); 07's log: "
          f"{log} ...", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):   # 07's own report
        ch07.main(["--preset", "tiny", "--duration", str(args.tiny_kimg / 1000), "--snap", str(args.tiny_snap),
                   "--tick", str(args.tiny_snap), "--phema", "0.05,0.07,0.1", "--outdir", run_dir,
                   "--resume", "auto", "--device", str(device), "--seed", str(args.seed)])
    snapshot, used, coefficients, error = reconstruct(run_dir, 0.07, from_sigma_rel=[0.05, 0.1])
    last = max(s.nimg for s in used)
    read = lambda path: torch.load(path, map_location="cpu", weights_only=True)
    tracked = read(phema_path(run_dir, 0.07, last))["state_dict"]
    raw = read(os.path.join(run_dir, ch07.STATE))["net"]
    relative = lambda other: float((flat_state(other) - flat_state(tracked)).norm() / flat_state(tracked).norm())
    difference, moved = relative(snapshot["state_dict"]), relative({k: raw[k] for k in tracked})
    print(f"(c) sigma_rel 0.07 at {last / 1e3:g} kimg from {len(used)} snapshots of 0.05 and 0.1: profile error "
          f"{error:.2e}; |reconstructed - tracked| / |tracked| = {difference:.2e} (the raw weights differ from the "
          f"tracked EMA by {moved:.2e})")
    return dict(error=error, difference=difference, moved=moved, snapshots=len(used), kimg=last / 1e3)


# ----------------------------------------------------------------------------
# Figures.

def plot(tracker, results, study, args, file):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    fig.suptitle("EDM2's post-hoc EMA: any EMA width from two stored power-function EMAs", fontsize=11)
    ax = axes[0]
    t = tracker.t
    tau = np.linspace(0, t, 2001)
    for target, colour in ((0.02, "tab:red"), (0.20, "tab:green")):
        _, c, error, used = reconstruct_weights(tracker.snapshots, target, t)
        q = sum(ci * profile(tau, ti, phema_gamma(si)) for ci, (ti, si, _) in zip(c, used))
        ax.plot(tau, profile(tau, t, phema_gamma(target)), color=colour, ls="--", lw=2,
                label=f"target sigma_rel {target:g}")
        ax.plot(tau, q, color=colour, lw=1, label=f"reconstructed (profile error {error:.1%})")
    for ti in sorted({ti for ti, _, _ in tracker.snapshots})[-4:]:
        for s, colour in zip(STORED, ("0.45", "0.75")):
            ax.plot(tau, profile(tau, ti, phema_gamma(s)), color=colour, lw=0.8,
                    label=f"stored sigma_rel {s:g} (last 4 snapshots)" if ti == t else None)
    ax.set_xlim(0.5 * t, t * 1.01)
    ax.set_xlabel("training step tau")
    ax.set_ylabel("weight of theta(tau) in the average")
    ax.set_title("Profiles: stored, target, reconstructed", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1]
    for step, style in ((args.toy_steps, "-"), (args.toy_steps // 2, ":")):
        rows = results[step]
        s = [r["sigma_rel"] for r in rows]
        ax.plot(s, [r["reconstructed"] for r in rows], style, color="tab:blue", label=f"reconstructed, step {step}")
        ax.plot(s, [r["tracked"] for r in rows], "o", color="tab:orange", mfc="none" if style == ":" else None,
                label=f"tracked during training, step {step}")
    ax.axhline(results["final"], color="0.4", ls="--", lw=1, label="raw final weights")
    ax.axhline(results["floor"], color="0.7", ls="-.", lw=1, label="noise floor (two data draws)")
    ax.set_xscale("log")
    ax.set_xlabel("EMA width sigma_rel")
    ax.set_ylabel("W1 to the exact data distribution")
    ax.set_title("Toy: sample quality vs EMA length", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[2]
    for (target, rows), colour in zip(study.items(), ("tab:red", "tab:purple", "tab:green")):
        n = [r[0] for r in rows]
        ax.plot(n, [r[1] for r in rows], "o-", color=colour, label=f"profile error, sigma_rel {target:g}")
        ax.plot(n, [r[2] for r in rows], "s--", color=colour, ms=4, label=f"weight error, sigma_rel {target:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("snapshots per stored profile")
    ax.set_ylabel("relative error")
    ax.set_title("Error vs number of snapshots (toy, last step)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)



# ----------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    toy = parser.add_argument_group("the demo (without --run)")
    toy.add_argument("--toy-steps", type=common.number(int, low=100), default=2000,
                     help="training steps of the toy (default: 2000)")
    toy.add_argument("--snapshot-every", type=common.number(int, low=1), default=100,
                     help="toy steps between snapshots of the stored profiles (default: 100)")
    toy.add_argument("--samples", type=common.number(int, low=100), default=4000,
                     help="toy samples per EMA (default: 4000)")
    toy.add_argument("--sampler-steps", type=common.number(int, low=2), default=18,
                     help="steps of 04's Algorithm 2 (default: 18 = 35 NFE)")
    toy.add_argument("--tiny-kimg", type=common.number(float, low=1), default=4,
                     help="length of case (c)'s 07 --preset tiny run, kimg (default: 4)")
    toy.add_argument("--tiny-snap", type=common.number(float, low=0.001), default=1,
                     help="its snapshot interval, kimg (default: 1)")
    given = parser.add_argument_group("reconstruct from a 07 run trained with --phema")
    sigma_rel = dict(low=1e-6, high=PHEMA_SIGMA_REL_MAX)
    given.add_argument("--run", metavar="DIR", help="the run folder (holds phema-<sigma_rel>-<kimg>.pt)")
    given.add_argument("--sigma-rel", type=common.number(float, **sigma_rel), default=0.07,
                       help="width of the EMA to build (default: 0.07)")
    given.add_argument("--at-kimg", type=common.number(float, low=0.001), default=None,
                       help="the EMA of a run stopped here (default: the last snapshot)")
    given.add_argument("--from", dest="from_", metavar="LIST", type=common.number_list(float, **sigma_rel),
                       help="stored sigma_rel values to combine, e.g. 0.05,0.10 (default: all)")
    given.add_argument("--out", metavar="FILE", help="the snapshot to write (08_evaluate_fid.py --network reads it)")
    return parser.parse_args(argv)


def main(argv=None):
    common.run(demo, parse_args(argv))


def demo(args):
    if args.run is not None:
        return command_line(args)
    device, outdir = common.start(__file__, args)
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)      # a 37k-parameter MLP: on a shared 2-core CPU threads only contend
    results, tracker, _ = toy_run(args, device, print)
    print_toy(results, args)
    study = snapshot_count_study(tracker)
    print_study(study)
    torch.set_num_threads(threads)   # 07's training keeps its threads
    tiny = tiny_run(args, device, outdir)
    plot(tracker, results, study, args, f"{outdir}/post_hoc_ema.png")
    print_conclusion(results, study, tiny, args, outdir, time.time() - start)


def print_conclusion(results, study, tiny, args, outdir, seconds):
    """The claims of the figure, each from the numbers printed above."""
    floor, end, middle = results["floor"], results[args.toy_steps], results[args.toy_steps // 2]
    good = [r for r in end + middle if r["profile_error"] < 0.05]
    gap = max(abs(round(r["tracked"], 4) - round(r["reconstructed"], 4)) for r in good)   # as the tables print them
    narrow = study[min(study)][-1]
    below = all(row[2] <= row[3] for rows in study.values() for row in rows)

    def choice(rows):
        best = min(rows, key=lambda r: r["reconstructed"])
        stored = min((r for r in rows if r["sigma_rel"] in STORED), key=lambda r: r["reconstructed"])
        gain = stored["reconstructed"] - best["reconstructed"]
        return f"{best['sigma_rel']:g} (W1 {best['reconstructed']:.4f}; best stored {stored['sigma_rel']:g}: " \
               f"{stored['reconstructed']:.4f}, {'a gain' if gain > floor else 'no gain'} beyond the noise floor)"
    print(f"""
What this shows ({outdir}/post_hoc_ema.png: profiles, W1 vs width, errors vs snapshots; {seconds:.0f} s)
  Two stored power-function EMAs (sigma_rel {STORED[0]:g}, {STORED[1]:g}) give the EMA of any width after training.
  Where the profile error is under 5%, the reconstructed and the tracked EMAs differ by at most {gap:.4f} in W1
  (noise floor {floor:.4f}); where it is larger they can differ more (table (a)).
  The best width at the end: {choice(end)};
  half-way: {choice(middle)}.
  Snapshots must be dense against the narrowest width wanted: {min(study):g} keeps a profile error of {narrow[1]:.1%}
  with {narrow[0]} snapshots per profile; the weight error is {"below" if below else "NOT always below"} its bound in \
every row (table (b)).
  A 07 run: 0.07 rebuilt from 0.05 and 0.1 differs from the tracked 0.07 by {tiny['difference']:.2e} of its norm
  (the raw weights by {tiny['moved']:.2e}): the profile error says in advance how far to trust a reconstruction.""")


if __name__ == "__main__":
    main()
