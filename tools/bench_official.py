"""Step for step against the official code: this project's networks beside NVlabs/edm's, in one process.

Two steps are timed, as the two programs run them:
  train   one training step: 05's EDMLoss (official: training.loss.EDMLoss) forward on a batch, backward of
          loss.sum() / batch, one Adam step (07's settings; official: torch.optim.Adam as its train.py builds it);
  sample  one sampling forward: eval mode, no grad, float64 images and ONE 0-d sigma as a sampler passes them
          (ours: the network as 06's for_sampling prepares it, called through common.denoise; official: as its
          generate.py calls net(x, t_hat, class_labels)).

With --official PATH (a clone of https://github.com/NVlabs/edm; read from there, never copied here) both networks
are built from the same configuration and hold the same weights (the official network gets a copy of ours: the
state-dict keys are the same), are checked to give the same outputs, and are timed in PAIRS: each pair runs one
step of each, alternating which goes first, and gives the ratio official time / our time (>= 1.00: ours is at
least as fast). Reported: the median paired ratio, its range over the pairs and the median's 95 % confidence
interval (an interval that holds 1.00 means: no difference shown; on a 2-core CPU deciding 1 % took 64 pairs),
with the load average before and after. Pairs cancel what drifts slowly on a shared machine; the median drops the
pairs a burst of load hit; an even number of pairs (the defaults) lets each side go first equally often.
Without --official: ours alone, img/s and TFLOP/s (06's FLOP count of the forward; a training step as 3x it).
--compare OPTION pairs ours with the option against ours without it instead (07's --channels-last, --compile,
--precision bf16): the ratio is then plain time / time with the option.

  python tools/bench_official.py --official /path/to/edm                 # paired ratios, DDPM++ and ADM
  python tools/bench_official.py --official /path/to/edm --profile       # + torch.profiler tables, op by op
  python tools/bench_official.py --compare channels-last                 # what an option buys
  python tools/bench_official.py --device cuda --official /path/to/edm   # the same on a GPU
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the chapters' folder
import common  # noqa: E402

ch05 = common.load("05_preconditioning")
ch06 = common.load("06_unet")

NAMES = {"ddpmpp": "cifar10_ddpmpp_cond", "ncsnpp": "cifar10_ncsnpp_uncond", "adm": "imagenet64_adm_cond"}
BATCH = {"cpu": {"ddpmpp": 8, "ncsnpp": 8, "adm": 2}, "cuda": {"ddpmpp": 128, "ncsnpp": 128, "adm": 32}}
COMPARE = ("channels-last", "compile", "bf16")


def load_official(path):
    """The official training.networks and training.loss modules, imported from a checkout at `path`."""
    needed = ["training/networks.py", "training/loss.py", "torch_utils/persistence.py", "dnnlib/util.py"]
    missing = [f for f in needed if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ValueError(f"--official {path}: not an NVlabs/edm checkout (no {missing[0]}); clone "
                         "https://github.com/NVlabs/edm and pass its folder")
    try:
        import requests  # noqa: F401
    except ImportError:
        # dnnlib/util.py imports requests at its top, for downloading URLs; networks and losses never call it,
        # and it is not one of this project's dependencies: an empty stand-in lets the import go through.
        sys.modules["requests"] = types.ModuleType("requests")
    sys.path.insert(0, os.path.abspath(path))
    import training.loss
    import training.networks
    return training.networks, training.loss


# ----------------------------------------------------------------------------
# One side of a pair: a network, its optimizer and loss, and the two steps.

class Side:
    """A network with what its program trains and samples it with. `kind`: 'ours', 'official' or 'plain'
    (ours, in the pair of --compare); `option`: the --compare option this side runs with, or None."""

    def __init__(self, kind, net, loss_fn, optimizer, option, batch, device):
        self.kind, self.net, self.loss_fn, self.optimizer, self.option = kind, net, loss_fn, optimizer, option
        self.run = torch.compile(net) if option == "compile" else net
        # What each program samples with: ours a copy prepared as 08 loads networks (06's for_sampling: channels_last
        # on a CPU), the official network itself in eval mode.
        self.sampler = net if kind == "official" else ch06.for_sampling(copy.deepcopy(net), device)
        self.sampler = torch.compile(self.sampler) if option == "compile" else self.sampler
        dtype = torch.bfloat16 if option == "bf16" else torch.float32
        self.autocast = lambda: torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
        self.memory_format = torch.channels_last if option == "channels-last" else torch.contiguous_format
        generator = torch.Generator(device).manual_seed(0)
        r, c = net.img_resolution, net.img_channels
        self.images = torch.rand([batch, c, r, r], generator=generator, device=device) * 2 - 1
        self.images = self.images.contiguous(memory_format=self.memory_format)
        self.labels = None
        if net.label_dim:
            self.labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, [batch],
                                                                                  generator=generator, device=device)]
        self.x = (torch.randn([batch, c, r, r], generator=generator, device=device) * 2.5).to(torch.float64)
        self.sigma = torch.tensor(2.5, dtype=torch.float64, device=device)   # one 0-d sigma, as samplers pass it

    def train(self):
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(net=self.run, images=self.images, labels=self.labels)
        loss.sum().mul(1 / len(self.images)).backward()
        self.optimizer.step()

    def sample(self):
        self.sampler.eval()
        with torch.no_grad(), self.autocast():
            if self.kind == "official":   # the official generate.py: net(x_hat, t_hat, class_labels).to(float64)
                return self.sampler(self.x, self.sigma, self.labels).to(torch.float64)
            x = self.x.contiguous(memory_format=self.memory_format)
            return common.denoise(self.sampler, x, self.sigma, dict(class_labels=self.labels))


def build_sides(name, args, device, official):
    """(A, B) for config `name`: A = ours (with --compare's option), B = the official network or plain ours,
    with the same initial weights."""
    class_name, kwargs = ch06.PAPER_CONFIGS[NAMES[name]]
    kwargs = dict(kwargs, **({"model_channels": args.adm_channels} if name == "adm" and args.adm_channels else {}))
    batch = args.batch or BATCH[device.type][name]
    torch.manual_seed(0)
    ours = ch06.from_official_config(class_name, kwargs).to(device)
    if official:
        networks, losses = official
        other = getattr(networks, class_name)(**kwargs).to(device)
        other.load_state_dict(ours.state_dict(), strict=True)
        b_loss, b_kind = losses.EDMLoss(), "official"
        b_opt = torch.optim.Adam(other.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)   # official train.py
    else:
        other = ch06.from_official_config(class_name, kwargs).to(device)
        other.load_state_dict(ours.state_dict(), strict=True)
        b_loss, b_kind = ch05.EDMLoss(), "plain"
    if args.compare == "channels-last":
        ours = ours.to(memory_format=torch.channels_last)

    def adam(net):   # 07's optimizer: fused
        return torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)

    a = Side("ours", ours, ch05.EDMLoss(), adam(ours), args.compare, batch, device)
    b = Side(b_kind, other, b_loss, b_opt if official else adam(other), None, batch, device)
    return a, b, kwargs, class_name


def check_same_outputs(a, b):
    """The largest |D_a - D_b| relative to the largest |D_b| on the sampling inputs (weights are equal)."""
    da, db = a.sample(), b.sample()
    return ((da - db).abs().max() / db.abs().max()).item()


# ----------------------------------------------------------------------------
# Timing and profiling.

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(step, device):
    """(wall seconds, CPU seconds of this process) of one call of step."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def load_average():
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def paired(a, b, step, pairs, device):
    """[((wall, cpu) of A, (wall, cpu) of B)] for `pairs` pairs, A first in even pairs, B first in odd ones;
    one warm-up step each first."""
    for side in (a, b):
        getattr(side, step)()
    times = []
    for i in range(pairs):
        t = {side.kind: seconds(getattr(side, step), device) for side in ((a, b) if i % 2 == 0 else (b, a))}
        times.append((t[a.kind], t[b.kind]))
    return times


def alone(a, step, pairs, device):
    getattr(a, step)()
    return [seconds(getattr(a, step), device)[0] for _ in range(pairs)]


def spread(values):
    """'median [min - max]'."""
    values = sorted(values)
    return f"{statistics.median(values):.3f} [{values[0]:.3f} - {values[-1]:.3f}]"


def median_interval(values, level=0.95):
    """A confidence interval of the median, free of any assumption on the distribution: the k-th smallest and k-th
    largest values, for the largest k at which fewer than k of n values fall below (or above) the true median with
    probability at most (1 - level) / 2 -- a Binomial(n, 1/2) tail. With few values (n < 6 at 95 %): the range."""
    values, n = sorted(values), len(values)
    tail = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n         # P(Binomial(n, 1/2) < k)
    k = max([k for k in range(1, n // 2 + 1) if tail(k) <= (1 - level) / 2], default=1)
    return values[k - 1], values[n - k]


def profile_table(a, b, step, device, rows):
    """torch.profiler's self time per op of one step of each side, side by side, in ms: each side profiled twice
    (A B B A, after a warm-up), each op's smaller time kept (one profile alone carries the machine's noise)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for side in (a, b):
        getattr(side, step)()
    per_side = {a.kind: {}, b.kind: {}}
    for side in (a, b, b, a):
        synchronize(device)
        with profile(activities=activities) as prof:
            getattr(side, step)()
            synchronize(device)
        for e in prof.key_averages():
            t = per_side[side.kind].get(e.key, (float("inf"), 0))[0]
            per_side[side.kind][e.key] = (min(t, getattr(e, key) / 1e3), e.count)
    per_side = [per_side[a.kind], per_side[b.kind]]
    ops = sorted(set(per_side[0]) | set(per_side[1]),
                 key=lambda op: -max(s.get(op, (0, 0))[0] for s in per_side))
    totals = [sum(v[0] for v in s.values()) for s in per_side]
    lines = [f"    {'op (self ' + ('GPU' if device.type == 'cuda' else 'CPU') + ' time)':<60}"
             f"{a.kind + ' ms':>12}{'calls':>7}{b.kind + ' ms':>14}{'calls':>7}{'diff ms':>10}"]
    for op in ops[:rows]:
        (ta, na), (tb, nb) = (s.get(op, (0.0, 0)) for s in per_side)
        lines.append(f"    {op[:59]:<60}{ta:>12.1f}{na:>7}{tb:>14.1f}{nb:>7}{ta - tb:>+10.1f}")
    lines.append(f"    {'total (of the kept times)':<60}{totals[0]:>12.1f}{'':>7}{totals[1]:>14.1f}{'':>7}{totals[0] - totals[1]:>+10.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------

def bench(args):
    sys.stdout.reconfigure(line_buffering=True)   # progress shows in a log file too
    device = common.get_device(args.device)
    official = load_official(args.official) if args.official else None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # true fp32, as the paper
    torch.backends.cudnn.benchmark = True
    against = "the official code" if official else f"ours without --{args.compare}" if args.compare else None
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU thread(s), fp32 (TF32 off){', ours with ' + args.compare if args.compare else ''}")
    print("command: python " + " ".join(sys.argv))
    if against:
        print(f"ratio = time of {against} / time of ours{' with ' + args.compare if args.compare else ''}, "
              f"per pair (>= 1.00: ours is at least as fast); median [min - max] over the pairs"
              + ("; the CPU-time ratio counts only the seconds this process ran (a busy machine's other jobs drop out)"
                 if device.type == "cpu" else ""))
    for name in args.configs:
        a, b, kwargs, class_name = build_sides(name, args, device, official)
        batch, pairs = len(a.images), args.pairs or (4 if name == "adm" and device.type == "cpu" else 8)
        flops = ch06.size_and_flops(class_name, kwargs)[1]
        width = f", model_channels {kwargs['model_channels']}" if name == "adm" and args.adm_channels else ""
        print(f"\n{NAMES[name]} ({class_name}, {flops / 1e9:.2f} GFLOPs per image forward{width}), batch {batch}, "
              f"{pairs} {'pairs' if against else 'timed steps'}")
        if against:
            print(f"  same weights, same outputs: max |ours - {b.kind}| / max |{b.kind}| = {check_same_outputs(a, b):.1e}")
        for step in args.steps:
            load_before = load_average()
            step_flops = flops * (3 if step == "train" else 1)
            if against:
                times = paired(a, b, step, pairs, device)
                ta, tb = (statistics.median(t[i][0] for t in times) for i in (0, 1))
                cpu = f"   CPU-time ratio {spread(o[1] / u[1] for u, o in times)}" if device.type == "cpu" else ""
                ratios = [o[0] / u[0] for u, o in times]
                low, high = median_interval(ratios)
                print(f"  {name} {step:<7}ratio {spread(ratios)} (median's 95 % interval "
                      f"{low:.3f} - {high:.3f}){cpu}   ours {batch / ta:.3g} "
                      f"img/s, {b.kind} {batch / tb:.3g} img/s (medians)   load {load_before} -> {load_average()}")
            else:
                t = statistics.median(alone(a, step, pairs, device))
                print(f"  {name} {step:<7}{batch / t:.3g} img/s, {batch / t * step_flops / 1e12:.3g} TFLOP/s "
                      f"(median of {pairs})   load {load_before} -> {load_average()}")
            if args.profile and against:
                print(f"  profile of one {step} step:\n{profile_table(a, b, step, device, args.profile)}")
        del a, b


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--official", metavar="PATH", help="a clone of NVlabs/edm: time ours against it, in pairs")
    parser.add_argument("--compare", choices=COMPARE,
                        help="time ours with this option against ours without it (instead of the official code)")
    parser.add_argument("--configs", nargs="+", choices=list(NAMES), default=["ddpmpp", "adm"],
                        help="networks, of 06's PAPER_CONFIGS: ddpmpp (CIFAR-10 DDPM++ cond.), ncsnpp, adm "
                             "(ImageNet-64 ADM cond.) (default: ddpmpp adm)")
    parser.add_argument("--steps", nargs="+", choices=["train", "sample"], default=["train", "sample"],
                        help="which steps to time (default: both)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--batch", type=common.number(int, low=1), default=None,
                        help="images per step (default: DDPM++/NCSN++ 8, ADM 2 on the CPU; 128 and 32 on a GPU)")
    parser.add_argument("--pairs", type=common.number(int, low=1), default=None,
                        help="pairs (or timed steps) per step kind; even: each side first in half of them "
                             "(default: 8; ADM 4 on the CPU)")
    parser.add_argument("--adm-channels", type=common.number(int, low=64), default=None,
                        help="ADM's model_channels (default: the paper's 192; a multiple of 64)")
    parser.add_argument("--profile", type=common.number(int, low=1), default=None, metavar="ROWS",
                        help="after each paired timing, one profiled step per side: the ROWS ops with the most self time")
    args = parser.parse_args(argv)
    if args.official and args.compare:
        parser.error("--official and --compare are two different baselines: pass one")
    if args.adm_channels and args.adm_channels % 64:
        parser.error(f"--adm-channels must be a multiple of 64 (ADM's heads have 64 channels), got {args.adm_channels}")
    return args


def main(argv=None):
    common.run(bench, parse_args(argv))


if __name__ == "__main__":
    main()
