"""12: consistency models and Easy Consistency Tuning -- the boundary condition, the consistency condition against
the toy's exact flow map, Algorithm 1 seed for seed, consistency distillation under its derived bound, ECT through
07's loop (exact resume, torchrun) and 08 generating from its snapshots."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=8,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], embedding_type="positional",
                 encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])


@pytest.fixture(scope="module")
def C(load):
    return load("12_consistency_models")


# ----------------------------------------------------------------------------
# The consistency function.

class Huge(torch.nn.Module):
    """A raw network F whose output is enormous: the boundary must not depend on F at all."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return torch.full_like(x, 1e30)


def test_boundary_condition_holds_to_the_bit_for_any_network(C, load):
    toy = load("01_toy_1d")
    torch.manual_seed(0)
    unet = load("06_unet").from_official_config("ConsistencyPrecond", TINY_UNET)
    images = torch.randn(4, 3, 8, 8)
    for net, x in [(unet, images), (C.ConsistencyPrecond(toy.ToyMLP(), 1, 1, sigma_data=0.95), torch.randn(64, 1)),
                   (C.ConsistencyPrecond(Huge(), 8, 3, sigma_min=0.01), images)]:
        for sigma in (net.sigma_min, torch.tensor(net.sigma_min, dtype=torch.float64),
                      torch.full([len(x)], net.sigma_min)):           # a number, a 0-d float64 tensor, per example
            with torch.no_grad():
                assert torch.equal(net(x, sigma), x), f"f(x, sigma_min) != x for {type(net.model).__name__}"
        with torch.no_grad():
            assert not torch.equal(net(x, 2 * net.sigma_min), x)
    # Above the boundary the scalings are EDM's, up to the sigma_min shift (App. B.6 vs Song et al. App. C).
    c_skip, c_out, c_in, c_noise = unet.scalings(torch.tensor([80.0]))
    edm = load("05_preconditioning").EDMPrecond.scalings(unet, torch.tensor([80.0]))
    assert torch.allclose(c_skip, edm[0], rtol=1e-3) and torch.allclose(c_out, edm[1], rtol=1e-4)
    assert torch.equal(c_in, edm[2]) and torch.equal(c_noise, edm[3])


def test_from_diffusion_keeps_the_weights_and_refuses_other_preconditioners(C, load):
    ch06 = load("06_unet")
    torch.manual_seed(0)
    D = ch06.from_official_config("EDMPrecond", dict(TINY_UNET, sigma_data=0.4, dropout=0.1))
    f = C.from_diffusion(D, sigma_min=0.003, dropout=0.2)
    assert type(f).__name__ == "ConsistencyPrecond" and (f.sigma_min, f.sigma_data) == (0.003, 0.4)
    assert f.init_config["kwargs"]["dropout"] == 0.2
    for name, tensor in D.state_dict().items():
        assert torch.equal(f.state_dict()[name], tensor), name
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor(40.0)
    with torch.no_grad():                                  # far above sigma_min f is close to D; D is unchanged
        assert (f.eval()(x, sigma) - D.eval()(x, sigma)).abs().max() < 1e-3 * x.abs().max()
    with pytest.raises(ValueError, match="EDM-preconditioned"):
        C.from_diffusion(ch06.from_official_config("VPPrecond", TINY_UNET))


# ----------------------------------------------------------------------------
# The consistency condition against the toy's exact flow map f* (Eq. 4 solved from sigma to sigma_min with D*).

class ExactFlowMap:
    """f*(x; sigma) of the toy (1024 3M steps: converged to ~1e-6), called as a network with one noise level per
    batch; `perturb(sigma)` is added."""

    def __init__(self, C, mix, perturb=lambda sigma: 0.0):
        self.C, self.mix, self.perturb = C, mix, perturb

    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        sigma = float(torch.as_tensor(sigma).flatten()[0])
        return self.C.flow_map(self.mix, x, sigma, num_steps=1024) + self.perturb(sigma)


@pytest.mark.parametrize("t, r", [(80.0, 40.0), (80.0, 0.5), (5.0, 4.99), (2.0, 0.002), (0.5, 0.1)])
def test_the_exact_flow_map_is_consistent_at_any_step_and_a_perturbed_map_is_not(C, load, t, r, one_thread):
    mix = load("01_toy_1d").default_mixture()
    g = torch.Generator().manual_seed(0)
    y = mix.sample(256, g)
    x_t = y + t * torch.randn(y.shape, generator=g, dtype=torch.float64)
    x_r = C.flow_map(mix, x_t, t, sigma_min=r, num_steps=1024)        # the ODE from (x_t, t) to r: one trajectory
    t_, r_ = torch.full([256, 1], t, dtype=torch.float64), torch.full([256, 1], r, dtype=torch.float64)
    exact = C.consistency_loss(ExactFlowMap(C, mix), x_t, t_, x_r, r_)
    assert exact.shape == (256, 1) and exact.mean() < 1e-5, float(exact.mean())   # f*'s own accuracy: ~1e-6
    shifted = ExactFlowMap(C, mix, lambda sigma: 0.01 * math.log(sigma / 0.002))   # 0 at the boundary only
    assert C.consistency_loss(shifted, x_t, t_, x_r, r_).mean() > 100 * max(float(exact.mean()), 1e-7)


def test_ect_pairs_share_the_noise_and_follow_the_stage(C):
    seen = []

    def net(x, sigma, labels=None, augment_labels=None):
        seen.append((x.clone(), sigma.clone()))
        return x
    y = torch.zeros(4096, 1)
    loss = C.ECTLoss(0.002, q=2, stage_kimg=1)
    for stage, nimg in [(0, 999), (3, 3000)]:
        seen.clear()
        loss.schedule(nimg)
        loss(net, y)
        (x_t, t), (x_r, r) = seen
        assert loss.stage == stage and (t > 0.002).all() and (r >= 0.002).all() and (r < t).all()
        assert torch.allclose(x_t / t, x_r / r)                         # y = 0: x / sigma is the shared noise n
        delta = t * (1 + 8 * torch.sigmoid(-t)) / 2 ** (stage + 1)      # ECT's mapping, k = 8, b = 1, q = 2
        assert torch.allclose(r, (t - delta).clamp(min=0.002))
    assert (r == 0.002).float().mean() < 0.1 and (t.log().mean() + 1.1).abs() < 0.1   # stage 3: few at the boundary


class Affine(torch.nn.Module):
    """f(x; sigma) = x / (1 + sigma) + sigma w x (w per channel, float64): a closed form with a parameter, whose
    derivatives are 1 / (1 + sigma) + sigma w in x and sigma x in w."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64).view(3, 1, 1))

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return x / (1 + sigma) + sigma * self.w * x


@pytest.mark.parametrize("c", [0.0, 0.03, 1.0, 50.0])
def test_pseudo_huber_distance_on_images_by_hand(C, c):
    """ECT's distance (locuslab/ect's ECMLoss, CIFAR-10): the sum of squares over all C x H x W values of an image,
    sqrt(that + c^2) - c (c = 0: the L2 norm itself, not squared, not per value), over t - r; f(x_r; r) a target
    without gradient."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    x_r = (x_t.detach() + 0.3 * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = torch.tensor([80.0, 2.0, 0.5, 0.01], dtype=torch.float64).view(-1, 1, 1, 1)
    r = t * torch.tensor([0.5, 0.9, 0.1, 0.2], dtype=torch.float64).view(-1, 1, 1, 1)
    net = Affine()
    loss = C.consistency_loss(net, x_t, t, x_r, r, c=c)
    w, xt, xr = net.w.detach(), x_t.detach(), x_r.detach()
    diff = (xt / (1 + t) + t * w * xt) - (xr / (1 + r) + r * w * xr)       # f(x_t; t) - f(x_r; r) by hand
    root = (sum(diff[:, k, i, j] ** 2 for k in range(3) for i in range(8) for j in range(8)) + c ** 2).sqrt()
    expected = (root - c) / (t - r).flatten()                              # 192 values per image, summed
    assert loss.shape == (4, 1, 1, 1)
    assert torch.allclose(loss.flatten(), expected, rtol=1e-12, atol=0), (loss.flatten(), expected)
    loss.sum().backward()
    u = diff / (root * (t - r).flatten()).view(-1, 1, 1, 1)                 # d loss / d f(x_t; t)
    assert x_r.grad is None                                                 # the target is a constant
    assert torch.allclose(x_t.grad, u * (1 / (1 + t) + t * w), rtol=1e-10, atol=0)
    assert torch.allclose(net.w.grad, (u * t * xt).sum((0, 2, 3)).view(3, 1, 1), rtol=1e-10, atol=0)


def test_ect_pairs_see_one_augmentation_and_its_labels(C):
    """With an augment pipe, f(x_t; t) and f(x_r; r) both see the one augmented y (x_t = y + t n, x_r = y + r n)
    and its augment labels. The stub pipe augments differently at every call: a second call would show."""
    calls, seen = [], []

    def pipe(images):
        k = len(calls) + 1
        calls.append((images.flip(3) + k, torch.full([len(images), 9], float(k), dtype=images.dtype)))
        return calls[-1]

    def net(x, sigma, labels=None, augment_labels=None):
        seen.append((x, sigma, labels, augment_labels))
        return x
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    classes = torch.nn.functional.one_hot(torch.randint(4, [64], generator=g), 4).double()
    C.ECTLoss(0.002)(net, images, classes, augment_pipe=pipe)
    assert len(calls) == 1, f"the pipe was called {len(calls)} times for one batch"
    ((y, augment_labels),) = calls
    (x_t, t, labels_t, augment_t), (x_r, r, labels_r, augment_r) = seen
    assert labels_t is classes and labels_r is classes
    assert augment_t is not None and torch.equal(augment_t, augment_labels)
    assert augment_r is not None and torch.equal(augment_r, augment_labels)
    assert (r < t).all() and torch.allclose((r * x_t - t * x_r) / (r - t), y, rtol=0, atol=1e-9)   # the y of both


# ----------------------------------------------------------------------------
# Algorithm 1.

def test_multistep_sampler_is_algorithm_1_and_seed_exact_across_batch_sizes(C, load):
    fid, common = load("08_evaluate_fid"), load("common")
    torch.manual_seed(0)
    net = load("06_unet").from_official_config("ConsistencyPrecond", TINY_UNET).eval()
    sample = C.make_sampler(3, sigma_min=0.5, sigma_max=20.0, rho=7.0)
    assert sample.settings["options"] == dict(num_steps=3, sigma_max=20.0, sigma_min=0.5, rho=7.0)
    seeds = [3, 1, 4, 15, 9, 2]
    together = fid.generate_batch(net, seeds, "cpu", sample)
    for split in ([1] * 6, [2, 2, 2], [4, 2]):
        parts, start = [], 0
        for n in split:
            parts.append(fid.generate_batch(net, seeds[start:start + n], "cpu", sample))
            start += n
        assert torch.equal(torch.cat(parts), together), split
    # By hand: f at tau_0 = sigma_max, then x + sqrt(tau_i^2 - sigma_min^2) z, f at tau_i; z per seed, after the latents.
    rnd = common.StackedRandomGenerator("cpu", seeds)
    x = rnd.randn([6, 3, 8, 8]).double()
    taus = common.edm_sigma_steps(3, 0.5, 20.0, 7.0)[:-1]
    with torch.no_grad():
        for i, tau in enumerate(taus):
            x = x * tau if i == 0 else x + (tau ** 2 - net.sigma_min ** 2).sqrt() * rnd.randn([6, 3, 8, 8],
                                                                                              dtype=torch.float64)
            x = net(x.float(), tau.float()).double()
    assert torch.equal(common.to_uint8(x).permute(0, 3, 1, 2), together)
    rnd = common.StackedRandomGenerator("cpu", seeds)          # the same draws: equal before the uint8 rounding too
    with torch.no_grad():
        assert torch.equal(sample(net, rnd.randn([6, 3, 8, 8]), None, rnd.randn_like), x)
    one = fid.generate_batch(net, seeds, "cpu", C.make_sampler(1, sigma_max=20.0))
    assert not torch.equal(one, together)


# ----------------------------------------------------------------------------
# Consistency distillation on the toy, under the bound derived in 12's cd_bound.

def test_distillation_stays_under_its_derived_bound(C, load, one_thread):
    """cd_bound: with f(x_1; sigma_min) = x_1, f(x_N; t_N) - f*(x_N) telescopes along the teacher's Heun steps into
    the consistency residuals plus Heun's own error on CD's grid, so RMS error <= e_grid + sum(rho). Trained briefly,
    the bound itself must fall below sigma_data / 2 (~0.48; the data mean, D*'s answer at sigma = 80, is ~0.95 away),
    i.e. CD has learned the flow map. Swapped c_skip and c_out (no boundary) end ~75 away."""
    toy = load("01_toy_1d")
    mix = toy.default_mixture()
    torch.manual_seed(0)
    f = C.ConsistencyPrecond(toy.ToyMLP(), 1, 1, sigma_data=0.95)
    loss = C.DistillationLoss(mix, c=1.0)
    toy.train_toy(f, mix, loss, 1000, 256, 2e-3, 0)
    bound = C.cd_bound(f, mix, loss.levels, 2048, 1)
    assert list(bound) == [float(loss.levels[6]), float(loss.levels[12]), 80.0]
    for t, (error, e_grid, rho) in bound.items():
        assert error <= e_grid + rho + 1e-6, (t, error, e_grid, rho)
        assert e_grid + rho < 0.95 / 2, (t, e_grid, rho)
    assert 0.01 < bound[80.0][1] < 0.05                                 # Heun's 17 steps are not exact, nor far off


def test_distillation_refuses_an_augment_pipe_it_cannot_give_the_teacher(C, load):
    """The teacher's Heun step takes no augment labels: an augment_pipe is refused, not silently dropped."""
    mix = load("01_toy_1d").default_mixture()
    f = C.ConsistencyPrecond(load("01_toy_1d").ToyMLP(), 1, 1, sigma_data=0.95)
    with pytest.raises(ValueError, match="takes no augmentation"):
        C.DistillationLoss(mix)(f, torch.zeros(4, 1), augment_pipe=lambda images: (images, None))


# ----------------------------------------------------------------------------
# ECT through 07's loop: a tiny 07 snapshot (conftest's tiny_network, 16x16 shapes), tuned for 8 steps.

TUNE = ["--kimg", "0.128", "--batch", "16", "--batch-gpu", "8", "--lr", "5e-4", "--lr-rampup", "0", "--ema", "0.0005",
        "--dropout", "0.1", "--stage-kimg", "0.032", "--q", "2", "--tick", "0.032", "--snap", "0.064", "--device", "cpu"]


def tune(C, network, outdir, *extra):
    C.main(["tune", "--network", network, "--outdir", str(outdir), *TUNE, *map(str, extra)])


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tuned(C, tiny_network, tmp_path_factory):
    """An uninterrupted tune (8 steps of 16, 4 stages, dropout on, 2 accumulation rounds): its run folder."""
    out = tmp_path_factory.mktemp("tune") / "a"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tune(C, tiny_network, out)
    finally:
        torch.set_num_threads(threads)
    return out


def test_tune_runs_through_07_and_resumes_bit_for_bit(C, load, tiny_network, tuned, tmp_path, one_thread):
    reference = state(tuned / "training-state.pt")
    assert reference["cur_nimg"] == 128 and reference["args"]["stage_kimg"] == 0.032
    with open(tuned / "training_options.json") as f:
        options = json.load(f)
    assert options["network"]["class_name"] == "ConsistencyPrecond" and options["data"] == "shapes"
    f = load("06_unet").load_network(str(tuned / "network-snapshot-000000.pt"))    # 07 names snapshots by kimg
    assert type(f).__name__ == "ConsistencyPrecond" and f.init_config["kwargs"]["dropout"] == 0.1
    teacher = load("06_unet").load_network(tiny_network)
    assert not torch.equal(reference["net"]["model.enc.16x16_conv.weight"],
                           teacher.state_dict()["model.enc.16x16_conv.weight"])

    tune(C, tiny_network, tmp_path / "b", "--stop-kimg", 0.064)             # stopped after 4 of 8 steps (stage 2)
    assert state(tmp_path / "b" / "training-state.pt")["cur_nimg"] == 64
    tune(C, tiny_network, tmp_path / "b", "--resume", "auto")
    resumed = state(tmp_path / "b" / "training-state.pt")
    for key in ("net", "ema"):
        for name, tensor in reference[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    for a, b in zip(reference["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="cannot resume with different --q"):
        tune(C, tiny_network, tmp_path / "b", "--resume", "auto", "--q", 4)


def test_tune_with_augment_feeds_the_pipe_and_its_labels_to_the_network(C, load, tiny_network, tmp_path,
                                                                         monkeypatch, one_thread):
    """--augment > 0 through 07's loop: 07's AugmentPipe is called once per micro-batch and its labels reach the
    network: map_augment (no bias) gets a gradient only from non-zero augment labels, so its weights move only
    then. The teacher: the tiny 07 network's weights in the same U-Net with augment labels (map_augment fresh)."""
    ch06, ch07 = load("06_unet"), load("07_train_cifar10")
    tiny = ch06.load_network(tiny_network)
    torch.manual_seed(0)
    teacher = ch06.from_official_config("EDMPrecond", dict(tiny.init_config["kwargs"], augment_dim=9))
    assert teacher.load_state_dict(tiny.state_dict(), strict=False).missing_keys == ["model.map_augment.weight"]
    ch06.save_network(teacher, str(tmp_path / "aug.pt"))                     # no run folder: --data, --cond
    calls, pipe = [], ch07.AugmentPipe.__call__
    monkeypatch.setattr(ch07.AugmentPipe, "__call__", lambda self, x: calls.append(len(x)) or pipe(self, x))
    tune(C, str(tmp_path / "aug.pt"), tmp_path / "o", "--data", "shapes", "--cond", "--augment", 0.5,
         "--kimg", 0.048)                                                   # 3 steps of 2 micro-batches of 8
    assert calls == [8] * 6
    tuned = state(tmp_path / "o" / "training-state.pt")["net"]["model.map_augment.weight"]
    before = teacher.state_dict()["model.map_augment.weight"]
    assert (tuned != before).all() and (tuned - before).abs().mean() > 1e-4, tuned - before   # Adam: ~lr = 5e-4


def test_tune_refuses_what_it_cannot_tune_in_one_line(C, load, tiny_network, tmp_path, assert_one_line_errors):
    torch.manual_seed(0)
    vp = tmp_path / "vp.pt"
    load("06_unet").save_network(load("06_unet").from_official_config("VPPrecond", TINY_UNET), str(vp))
    texts = assert_one_line_errors("12_consistency_models.py", [
        ["tune", "--network", str(tmp_path / "missing.pt"), "--outdir", str(tmp_path / "o"), "--data", "shapes"],
        ["tune", "--network", str(vp), "--outdir", str(tmp_path / "o"), "--data", "shapes", "--resolution", "8"],
        ["tune", "--network", tiny_network, "--outdir", str(tmp_path / "o"), "--no-cond"],
    ], tmp_path, prefix=[])
    assert "no such checkpoint" in texts[0] and "EDM-preconditioned" in texts[1] and "4 classes" in texts[2]
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_tune_under_torchrun_with_two_processes(C, load, tiny_network, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "12_consistency_models.py"), "tune", "--network", tiny_network, "--outdir", str(out),
               *TUNE[:TUNE.index("--batch-gpu")], *TUNE[TUNE.index("--lr"):]]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "stats.jsonl") as f:
        snapshots = [line["rank_digests"] for line in map(json.loads, f) if "rank_digests" in line]
    assert len(snapshots) == 2 and all(len(d) == 2 and d[0] == d[1] for d in snapshots), snapshots
    with open(out / "training_options.json") as f:
        assert json.load(f)["world_size"] == 2
    assert type(load("06_unet").load_network(str(out / "network-snapshot-000000.pt"))).__name__ == "ConsistencyPrecond"


# ----------------------------------------------------------------------------
# 08 generate: a consistency snapshot samples with Algorithm 1, a diffusion snapshot as before.

def pngs(folder):
    names = sorted(n for n in os.listdir(folder) if n[0].isdigit())
    return {n: np.asarray(PIL.Image.open(os.path.join(folder, n))) for n in names}


def test_08_generates_seed_exact_pngs_from_a_consistency_snapshot(C, load, tuned, tiny_network, tmp_path, capsys,
                                                                  one_thread):
    fid, ch06, ch04 = load("08_evaluate_fid"), load("06_unet"), load("04_stochastic_sampler")
    snapshot = str(tuned / "network-snapshot-000000.pt")
    f = ch06.load_network(snapshot)
    for steps in (1, 2):
        runs = {}
        for batch in (6, 4):
            folder = tmp_path / f"s{steps}b{batch}"
            fid.main(["generate", "--network", snapshot, "--seeds", "0-5", "--steps", str(steps), "--batch",
                      str(batch), "--outdir", str(folder), "--device", "cpu"])
            runs[batch] = pngs(folder)
        assert runs[6].keys() == runs[4].keys() and all(np.array_equal(runs[6][n], runs[4][n]) for n in runs[6])
        direct = fid.generate_batch(f, list(range(6)), "cpu", C.make_sampler(steps))
        assert all(np.array_equal(runs[6][f"{s:06d}.png"], direct[s].permute(1, 2, 0).numpy()) for s in range(6))
        record = json.loads((tmp_path / f"s{steps}b6" / "generation.json").read_text())[0]
        assert (record["sampler"]["function"], record["nfe"]) == ("consistency_sampler", steps)
        assert f"{steps} NFE per image" in capsys.readouterr().out
    assert not all(np.array_equal(a, b) for a, b in zip(pngs(tmp_path / "s1b6").values(), pngs(tmp_path / "s2b6").values()))

    # A diffusion snapshot keeps today's sampler (04's Algorithm 2), and one step is not one of its options.
    fid.main(["generate", "--network", tiny_network, "--seeds", "0-3", "--steps", "3", "--outdir",
              str(tmp_path / "d"), "--device", "cpu"])
    direct = fid.generate_batch(ch06.load_network(tiny_network), [0, 1, 2, 3], "cpu", ch04.make_sampler(3))
    assert all(np.array_equal(pngs(tmp_path / "d")[f"{s:06d}.png"], direct[s].permute(1, 2, 0).numpy()) for s in range(4))
    assert json.loads((tmp_path / "d" / "generation.json").read_text())[0]["sampler"]["function"] == "edm_sampler"
    for network, flags, complaint in [(tiny_network, ["--steps", 1], "consistency model"),
                                      (snapshot, ["--solver", "ipndm"], "--solver chooses an ODE sampler")]:
        with pytest.raises(SystemExit) as exit:
            fid.main(["generate", "--network", network, *map(str, flags), "--outdir", str(tmp_path / "x"),
                      "--device", "cpu"])
        assert str(exit.value.code).startswith("error:") and complaint in str(exit.value.code)
        assert not os.path.exists(tmp_path / "x")
