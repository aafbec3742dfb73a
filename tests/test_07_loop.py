"""07's loop uses its settings: what the loop DID, observed from outside, checked against the paper's formulas.

Stop-and-resume and torchrun-agreement tests compare the code with itself; these watch one run instead
(issue 14). Observation points, installed around an unchanged 07 by `Recorder`:
  * a global optimizer pre-step hook: the learning rate of every step and the first step's gradient;
  * 07's `update_ema`, wrapped: the decay each update really applied, (ema_after - net) / (ema_before - net);
  * 05's `EDMLoss`, subclassed to wrap the network and the augment pipe it is handed: the images, sigma,
    noise, class and augment labels the network saw, and for the first step what it takes to recompute
    that step's gradient by hand (initial weights, inputs, targets, the RNG state dropout draws from);
  * under torchrun, DDP's communication hook (how often gradients were all-reduced) and the dropout
    mask of the first block with dropout.
The torchrun tests run THIS FILE as the script on each rank (see the end): every rank installs the same
observation points, runs 07's main(), and saves what it saw to rank<r>.pt.
"""
import collections
import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--device", "cpu"]
SIGMA_DATA, P_MEAN, P_STD = 0.5, -1.2, 1.2          # EDM's training distribution and sigma_data (Table 1)


class Recorder:
    """What one rank's training run did (see the module docstring)."""

    def __init__(self, T):
        self.T, self.step = T, 0
        self.lr, self.betas, self.calls, self.allreduces = [], [], [], []
        self.initial, self.grads, self.current, self.dropout_hooked, self.ema = None, None, None, False, None

    @contextlib.contextmanager
    def installed(self):
        recorder, base = self, self.T.ch05.EDMLoss

        class ObservedLoss(base):
            def __call__(self, net, images, labels=None, augment_pipe=None):
                return recorder.loss_call(base.__call__, self, net, images, labels, augment_pipe)

        class ObservedDDP(torch.nn.parallel.DistributedDataParallel):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.register_comm_hook(None, recorder.allreduce)

        hooks = [register_optimizer_step_pre_hook(self.before_step), register_optimizer_step_post_hook(self.after_step)]
        update_ema = self.T.update_ema
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(self.T.ch05, "EDMLoss", ObservedLoss)
                patch.setattr(self.T, "update_ema", lambda ema, net, beta: self.ema_update(update_ema, ema, net, beta))
                patch.setattr(torch.nn.parallel, "DistributedDataParallel", ObservedDDP)
                yield self
        finally:
            for hook in hooks:
                hook.remove()

    def loss_call(self, loss, loss_fn, net, images, labels, augment_pipe):
        call = dict(step=self.step, images=images.detach().clone(), labels=labels)
        self.current = call

        def pipe(x):
            y, augment_labels = augment_pipe(x)
            call["y"] = y.detach().clone()
            return y, augment_labels

        def network(x, sigma, class_labels=None, **kwargs):
            if self.initial is None:                                 # before the first step: initial weights
                self.initial = {k: v.clone() for k, v in getattr(net, "module", net).state_dict().items()}
            self.hook_dropout(net)
            augment_labels = kwargs.get("augment_labels")
            call.update(x=x.detach().clone(), sigma=sigma.detach().flatten().clone(),
                        augment_labels=None if augment_labels is None else augment_labels.detach().clone(),
                        rng=torch.get_rng_state() if self.step == 0 else None)
            return net(x, sigma, class_labels, **kwargs)

        result = loss(loss_fn, network, images, labels, pipe if augment_pipe is not None else None)
        call.setdefault("y", call["images"])
        self.calls.append(call)
        return result

    def hook_dropout(self, net):
        """Record which inputs the first block with dropout zeroed (its conv1 reads the dropped features)."""
        if self.dropout_hooked:
            return
        self.dropout_hooked = True
        for block in net.modules():
            if isinstance(getattr(block, "dropout", None), float) and block.dropout > 0 and hasattr(block, "conv1"):
                block.conv1.register_forward_pre_hook(lambda _, inputs: self.current.update(dropped=inputs[0] == 0))
                return

    def ema_update(self, update_ema, ema, net, beta):
        self.ema = self.ema or ema              # the half-life EMA, updated first each step (--phema's come after)
        if ema is not self.ema:
            return update_ema(ema, net, beta)
        flat = lambda module: torch.cat([p.detach().double().flatten() for p in module.parameters()])
        before = flat(ema)
        update_ema(ema, net, beta)
        after, now = flat(ema) - flat(net), before - flat(net)   # after = beta * now
        applied = float(after @ now / (now @ now)) if now.abs().max() > 0 else None   # None: net == ema, any beta
        self.betas.append(dict(argument=float(beta), applied=applied))

    def before_step(self, optimizer, args, kwargs):
        self.lr.append(optimizer.param_groups[0]["lr"])
        if self.step == 0:
            self.grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                          for group in optimizer.param_groups for p in group["params"]]

    def after_step(self, optimizer, args, kwargs):
        self.step += 1

    def allreduce(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        self.allreduces.append(dict(step=self.step, bucket=bucket.index(), last=bucket.is_last()))
        return allreduce_hook(state, bucket)

    def result(self):
        return dict(lr=self.lr, betas=self.betas, calls=self.calls, allreduces=self.allreduces,
                    initial=self.initial, grads=self.grads, steps=self.step)


# ----------------------------------------------------------------------------
# The formulas the observations are checked against (Table 7 and Sec. 5 of the paper).

def expected_lr(step, batch, lr, rampup_mimg):
    """Linear ramp-up from 0 to lr over the first rampup_mimg million images, then constant."""
    return lr * min(step * batch / (rampup_mimg * 1e6), 1)


def expected_beta(cur_nimg, batch, halflife_mimg):
    """The EMA forgets half its weight every `halflife` images (early on at most 5% of the images seen);
    one step is `batch` images -- the GLOBAL batch, over every rank and accumulation round."""
    halflife = min(halflife_mimg * 1e6, 0.05 * cur_nimg)
    return 0.5 ** (batch / max(halflife, 1e-8))


def edm_weight(sigma):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1)."""
    return (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2


def ks_normal(values, mean, std):
    """Kolmogorov-Smirnov distance between the sample and N(mean, std^2)."""
    x = np.sort((np.asarray(values, np.float64) - mean) / std)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    n = len(x)
    return max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())


def check_lr(observed, batch, lr, rampup_mimg):
    for step, got in enumerate(observed):
        want = expected_lr(step, batch, lr, rampup_mimg)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (
            f"step {step} ran at lr {got:.4e}, but the ramp-up (lr {lr} reached after {rampup_mimg * 1e6:g} images) "
            f"gives {want:.4e} after {step * batch} images; constant lr would be {lr:.4e}")


def check_ema(betas, steps, batch, halflife_mimg, per_gpu_batches):
    assert len(betas) == steps, f"the EMA was updated {len(betas)} times in {steps} optimizer steps"
    for step, beta in enumerate(betas):
        want = expected_beta(step * batch, batch, halflife_mimg)
        wrong = {f"{b} images": expected_beta(step * batch, b, halflife_mimg) for b in per_gpu_batches}
        if beta["applied"] is None:                             # the net had not moved (lr 0 at step 0)
            continue
        assert beta["applied"] == pytest.approx(want, abs=2e-3), (
            f"EMA update {step} kept {beta['applied']:.4f} of the old average; the half-life formula with the "
            f"global batch of {batch} images gives {want:.4f} (a per-GPU batch would give "
            + ", ".join(f"{v:.4f} for {k}" for k, v in wrong.items()) + ")")


def recomputed_gradient(load, options, initial, calls, batch):
    """The gradient of the mean EDM loss over the global batch, computed by hand from what the network saw."""
    ch06 = load("06_unet")
    net = ch06.from_official_config(options["network"]["class_name"], options["network"]["kwargs"]).train()
    net.load_state_dict(initial)
    total = 0
    for call in calls:
        torch.set_rng_state(call["rng"])                       # the same dropout masks
        sigma = call["sigma"].view(-1, 1, 1, 1)
        D = net(call["x"], sigma, call["labels"], augment_labels=call["augment_labels"])
        total = total + (edm_weight(sigma) * (D - call["y"]) ** 2).sum()
    (total / batch).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in net.parameters()]


def check_gradient(observed, expected, batch):
    flat = lambda grads: torch.cat([g.flatten().double() for g in grads])
    got, want = flat(observed), flat(expected)
    error = ((got - want).norm() / want.norm()).item()
    assert error < 1e-4, (
        f"the first step's gradient is not the gradient of the mean loss over the global batch of {batch} images "
        f"(relative error {error:.3g}; its norm is {(got.norm() / want.norm()).item():.3f} x the right one)")


def images_per_step(calls):
    counts = collections.Counter()
    for call in calls:
        counts[call["step"]] += len(call["images"])
    return counts


# ----------------------------------------------------------------------------
# One process: --batch 32 in 2 accumulation rounds of 16, augmentation p = 0.5, 64 steps (2048 images).

BATCH, BATCH_GPU, LR, RAMPUP, EMA, AUGMENT = 32, 16, 2e-3, 0.0004, 0.00005, 0.5
ONE = SMALL + ["--batch", BATCH, "--batch-gpu", BATCH_GPU, "--lr", LR, "--lr-rampup", RAMPUP, "--ema", EMA,
               "--augment", AUGMENT, "--duration", 0.002048]


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


@pytest.fixture(scope="module")
def one(T, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                    # as the one_thread fixture (module scope)
    out = tmp_path_factory.mktemp("one") / "run"
    try:
        with Recorder(T).installed() as recorder:
            T.main([str(a) for a in ONE] + ["--outdir", str(out)])
    finally:
        torch.set_num_threads(threads)
    with open(out / "training_options.json") as f:
        return recorder.result(), json.load(f)


def test_lr_during_the_ramp_up_is_tables_7_schedule(one):
    seen, _ = one
    assert seen["steps"] == 64 and len(seen["lr"]) == 64, (seen["steps"], len(seen["lr"]))
    check_lr(seen["lr"], BATCH, LR, RAMPUP)


def test_each_ema_update_uses_the_half_life_of_the_whole_batch_with_accumulation(one):
    seen, _ = one
    check_ema(seen["betas"], seen["steps"], BATCH, EMA, per_gpu_batches=[BATCH_GPU])


def test_sigma_the_network_trained_on_is_log_normal_p_mean_p_std(one):
    seen, _ = one
    sigma = torch.cat([call["sigma"] for call in seen["calls"]]).double()
    n = len(sigma)
    assert n == 2048, f"the network saw {n} noisy images in 64 steps of --batch {BATCH}"
    assert len(sigma.unique()) == n, f"{len(sigma.unique())} distinct sigma in {n} images: each image must draw " \
        f"its own noise level"
    ln = sigma.log()
    # Within 4.5 standard errors (a chance failure about 1 in 150,000 runs).
    assert abs(ln.mean().item() - P_MEAN) < 4.5 * P_STD / math.sqrt(n), \
        f"mean ln sigma {ln.mean().item():.3f}, EDM's P_mean is {P_MEAN}"
    assert abs(ln.std().item() - P_STD) < 4.5 * P_STD / math.sqrt(2 * n), \
        f"std of ln sigma {ln.std().item():.3f}, EDM's P_std is {P_STD}"
    distance = ks_normal(ln, P_MEAN, P_STD)
    assert distance < 1.95 / math.sqrt(n), \
        f"ln sigma is not N({P_MEAN}, {P_STD}^2): Kolmogorov-Smirnov distance {distance:.3f} (p < 0.001)"


def test_noise_is_standard_normal_times_sigma(one):
    seen, _ = one
    z = torch.cat([((c["x"] - c["y"]) / c["sigma"].view(-1, 1, 1, 1)).flatten() for c in seen["calls"]]).double()
    assert abs(z.mean().item()) < 4.5 / math.sqrt(len(z)) and abs(z.std().item() - 1) < 4.5 / math.sqrt(2 * len(z)), \
        f"(x - y) / sigma has mean {z.mean().item():.4f} and std {z.std().item():.4f}, not 0 and 1"


def test_noise_sigma_and_augmentation_are_drawn_per_image_within_each_batch(one):
    """Each image of a micro-batch draws its own sigma, noise and augmentation (drawn once per batch they would
    still pass the rate tests above, which pool all images)."""
    seen, _ = one
    for call in seen["calls"]:
        z = (call["x"] - call["y"]) / call["sigma"].view(-1, 1, 1, 1)
        assert len(call["sigma"].unique()) == len(z), "images of one batch share a noise level"
        assert not torch.isclose(z[0], z[1:]).all((1, 2, 3)).any(), "images of one batch share their noise"
    fired = [call["augment_labels"] != 0 for call in seen["calls"]]
    # At p = 0.5 over 16 images a transform fires for all or none with probability 2 x 0.5^16 (x-flip: a fair
    # coin); y-flip (p/2 = 0.25) does so with probability 0.75^16 ~ 1 %.
    for name, column in dict(xflip=0, yflip=1, scale=2, rotate=4, aniso=5, translate=7).items():
        mixed = sum(0 < f[:, column].sum() < len(f) for f in fired)
        assert mixed >= 0.9 * len(fired), f"{name}: only {mixed} of {len(fired)} batches had it fire for some images"


def test_augmentation_rate_the_network_was_told_is_p(one):
    seen, _ = one
    labels = [call["augment_labels"] for call in seen["calls"]]
    assert all(l is not None for l in labels), "the network was not given augment labels although --augment > 0"
    fired = (torch.cat(labels) != 0).double().mean(0)
    n = sum(len(l) for l in labels)
    # The paper's CIFAR-10 pipe: x-flip always a fair coin, y-flip p/2, each geometric transform p.
    expected = dict(xflip=(0, 0.5), yflip=(1, AUGMENT / 2), scale=(2, AUGMENT), rotate=(4, AUGMENT),
                    aniso=(5, AUGMENT), translate=(7, AUGMENT))
    for name, (column, rate) in expected.items():
        tolerance = 4.5 * math.sqrt(rate * (1 - rate) / n)
        assert abs(fired[column].item() - rate) < tolerance, \
            f"{name} fired for {fired[column].item():.3f} of {n} images; with --augment {AUGMENT} it should be {rate}"


def test_one_step_is_the_mean_gradient_of_batch_images_over_all_rounds(one, load, one_thread):
    seen, options = one
    counts = images_per_step(seen["calls"])
    assert set(counts.values()) == {BATCH}, f"images through the network per optimizer step: {dict(counts)}; " \
        f"--batch says {BATCH}"
    first = [call for call in seen["calls"] if call["step"] == 0]
    check_gradient(seen["grads"], recomputed_gradient(load, options, seen["initial"], first, BATCH), BATCH)


# ----------------------------------------------------------------------------
# Two ranks under torchrun (gloo): --batch 16 = 2 ranks x 2 rounds x 4; 32 images, 6 steps = 3 epochs;
# augmentation and dropout on, so that every random stream is exercised.

DDP_BATCH, DDP_GPU, DDP_IMAGES, DDP_STEPS, DDP_EMA, DDP_RAMPUP = 16, 4, 32, 6, 0.005, 0.0002
DDP = SMALL + ["--batch", DDP_BATCH, "--batch-gpu", DDP_GPU, "--duration", DDP_BATCH * DDP_STEPS / 1e6,
               "--augment", 0.5, "--dropout", 0.2, "--lr", 2e-3, "--ema", DDP_EMA, "--lr-rampup", DDP_RAMPUP,
               "--snap", 0.048, "--phema", 0.1]


def class_folder(path):
    """32 distinct random 8x8 images in two class sub-folders; returns them as uint8 [N, 3, 8, 8]."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (DDP_IMAGES, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        os.makedirs(path / f"class{i % 2}", exist_ok=True)
        PIL.Image.fromarray(image).save(path / f"class{i % 2}" / f"{i:02d}.png")
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    images = class_folder(tmp / "data")
    out = tmp / "run"
    # --standalone: torchrun's agent binds a free port itself and shares its store with the ranks (no race for a
    # port with other jobs); gloo on the loopback device whatever the host name resolves to; one thread each.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(tmp)] + [str(a) for a in DDP] + ["--data", str(tmp / "data"), "--outdir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    with open(out / "training_options.json") as f:
        options = json.load(f)
    with open(out / "stats.jsonl") as f:
        stats = [json.loads(line) for line in f]
    return ranks, options, stats, images


@pytest.mark.slow
def test_torchrun_two_ranks_on_gloo_end_with_identical_weights(ddp):
    ranks, options, stats, _ = ddp
    snapshots = [line for line in stats if "rank_digests" in line]
    assert len(snapshots) == 2
    for line in snapshots:                      # every rank's hash of (net, EMA, --phema's EMA) at every snapshot
        assert len(line["rank_digests"]) == 2 and len(set(line["rank_digests"])) == 1, line["rank_digests"]
        assert len(line["rank_digests"][0].split("/")) == 3, line["rank_digests"]
    split = (options["world_size"], options["accumulation_rounds"], options["batch_gpu"])
    assert split == (2, 2, DDP_GPU), f"--batch {DDP_BATCH} was split as ranks x rounds x batch-gpu = {split}, " \
        f"not 2 x 2 x {DDP_GPU}"


@pytest.mark.slow
def test_torchrun_ranks_draw_different_noise_sigma_augmentation_and_dropout(ddp):
    ranks, *_ = ddp
    for step in range(DDP_STEPS):
        a, b = ([c for c in rank["calls"] if c["step"] == step] for rank in ranks)
        streams = dict(sigma=lambda c: c["sigma"], noise=lambda c: c["x"] - c["y"],
                       augmentation=lambda c: c["augment_labels"], dropout=lambda c: c["dropped"])
        for name, of in streams.items():
            for ca, cb in zip(a, b):
                assert not torch.equal(of(ca), of(cb)), \
                    f"step {step}: both ranks drew the same {name}: every rank must have its own random stream"


@pytest.mark.slow
def test_torchrun_shards_cover_each_image_exactly_once_per_epoch(ddp):
    ranks, _, _, images = ddp
    index = {image.numpy().tobytes(): i for i, image in enumerate(images)}
    seen = [collections.Counter() for _ in range(DDP_STEPS * DDP_BATCH // DDP_IMAGES)]
    for r, rank in enumerate(ranks):
        for call in rank["calls"]:
            pixels = ((call["images"] + 1) * 127.5).round().to(torch.uint8)
            epoch = call["step"] * DDP_BATCH // DDP_IMAGES
            seen[epoch].update(index[p.numpy().tobytes()] for p in pixels)
    for epoch, counts in enumerate(seen):
        twice = sorted(i for i, c in counts.items() if c > 1)
        never = sorted(set(range(DDP_IMAGES)) - set(counts))
        assert not twice and not never, f"epoch {epoch}: images {twice} trained on more than once and {never} " \
            f"not at all; the ranks' shards must split each epoch"


@pytest.mark.slow
def test_torchrun_gradients_are_averaged_once_per_step_over_the_global_batch(ddp, load, one_thread):
    ranks, options, _, _ = ddp
    counts = [images_per_step(rank["calls"]) for rank in ranks]
    per_step = {s: counts[0][s] + counts[1][s] for s in range(DDP_STEPS)}
    assert set(per_step.values()) == {DDP_BATCH}, f"images per step over both ranks: {per_step}; --batch says " \
        f"{DDP_BATCH}"
    for r, rank in enumerate(ranks):
        passes = collections.Counter(a["step"] for a in rank["allreduces"] if a["last"])
        assert all(passes[s] == 1 for s in range(DDP_STEPS)), f"rank {r}: gradients all-reduced {dict(passes)} " \
            f"times per step; once per optimizer step (no_sync in all other accumulation rounds)"
    first = [call for rank in ranks for call in rank["calls"] if call["step"] == 0]
    expected = recomputed_gradient(load, options, ranks[0]["initial"], first, DDP_BATCH)
    for rank in ranks:
        check_gradient(rank["grads"], expected, DDP_BATCH)


@pytest.mark.slow
def test_torchrun_ema_half_life_uses_the_global_batch(ddp):
    ranks, *_ = ddp
    for rank in ranks:
        check_ema(rank["betas"], rank["steps"], DDP_BATCH, DDP_EMA, per_gpu_batches=[DDP_BATCH // 2, DDP_GPU])
        check_lr(rank["lr"], DDP_BATCH, 2e-3, DDP_RAMPUP)


# ----------------------------------------------------------------------------
# torchrun runs this file on each rank: observe 07's main(argv) and save what was seen to <folder>/rank<r>.pt.

if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import common
    with Recorder(common.load("07_train_cifar10")).installed() as recorder:
        common.load("07_train_cifar10").main(sys.argv[2:])
    torch.save(recorder.result(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
