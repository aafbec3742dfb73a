"""07's training loop: schedules, data, exact resume, fallback to the previous checkpoint, bad input (torchrun:
test_07_loop.py)."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import PIL.Image

# A small version of --preset tiny: 8x8 shapes, a 2-level DDPM++ with 8 channels.
SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
         "--lr-rampup", "0.0002", "--device", "cpu"]


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def run(T, outdir, *extra):
    T.main(SMALL + ["--outdir", str(outdir)] + [str(e) for e in extra])


def stats(outdir):
    with open(os.path.join(outdir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------
# The schedules.

def test_learning_rate_ramps_linearly_then_stays(T):
    assert T.learning_rate(0, 1e-3, 10) == 0
    assert T.learning_rate(2.5e6, 1e-3, 10) == pytest.approx(0.25e-3)
    assert T.learning_rate(10e6, 1e-3, 10) == pytest.approx(1e-3)
    assert T.learning_rate(150e6, 1e-3, 10) == pytest.approx(1e-3)


def test_ema_halflife_is_measured_in_images(T):
    batch, halflife = 512, 0.5
    # Past the ramp-up: after halflife / batch steps the old average keeps exactly half its weight.
    beta = T.ema_beta(100e6, batch, halflife)
    assert beta ** (halflife * 1e6 / batch) == pytest.approx(0.5, rel=1e-9)
    # During the ramp-up the half-life is 5% of the images seen (here 0.05 x 2M = 100k < 500k).
    beta = T.ema_beta(2e6, batch, halflife)
    assert beta ** (0.05 * 2e6 / batch) == pytest.approx(0.5, rel=1e-9)
    assert T.ema_beta(0, batch, halflife) == 0                     # step 0: the average is the net
    assert T.ema_beta(2e6, batch, halflife, rampup_ratio=1) == pytest.approx(0.5 ** (batch / 5e5))   # no cap


def test_update_ema_is_the_convex_combination(T):
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * e.detach() + 0.1 * n.detach() for e, n in zip(ema.parameters(), net.parameters())]
    T.update_ema(ema, net, 0.9)
    for e, x in zip(ema.parameters(), expected):
        torch.testing.assert_close(e, x)


def test_compile_wraps_the_trained_module_and_may_change_on_resume(T):
    net = torch.nn.Linear(3, 2)
    args = T.parse_args(["--compile", "--device", "cpu"])
    ddp, autocast = T.accelerate(net, args, torch.device("cpu"), world_size=1)
    assert ddp is not net and ddp._orig_mod is net      # compiled lazily: the weights are net's, snapshots unchanged
    assert T.accelerate(net, T.parse_args([]), torch.device("cpu"), world_size=1)[0] is net
    assert "compile" in T.RESUMABLE and "tf32" not in T.RESUMABLE and "seed" not in T.RESUMABLE


def test_presets_are_the_papers_setups_and_flags_override_them(T):
    a = T.parse_args(["--preset", "cifar10", "--cond", "--lr", "2e-3"])
    # Table 7 (CIFAR-10): 200 Mimg, batch 512, lr 1e-3 (overridden here), EMA 0.5 Mimg, dropout 0.13, p_aug 0.12.
    assert (a.data, a.arch, a.precond, a.duration, a.batch, a.ema, a.dropout, a.augment, a.lr_rampup) == \
        ("cifar10", "ddpmpp", "edm", 200, 512, 0.5, 0.13, 0.12, 10)
    assert a.lr == 2e-3 and a.cond
    b = T.parse_args(["--preset", "imagenet64", "--data", "in64.zip"])
    assert (b.arch, b.cond, b.duration, b.batch, b.lr, b.ema, b.dropout, b.augment, b.precision) == \
        ("adm", True, 2500, 4096, 1e-4, 50, 0.10, 0, "fp16")
    assert T.parse_args([]).preset == "tiny"                           # the plain command runs the CPU demo


# ----------------------------------------------------------------------------
# The data stream and datasets.

def test_sampler_epochs_are_permutations_and_ranks_split_one_stream(T):
    one = T.InfiniteSampler(10, seed=3)
    stream = torch.cat([one.next(5) for _ in range(6)])               # 3 epochs
    for epoch in range(3):
        assert sorted(stream[10 * epoch:10 * epoch + 10].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])
    ranks = [T.InfiniteSampler(10, seed=3, rank=r, num_ranks=2) for r in range(2)]
    for step in range(5):                                             # rank r reads entries r, r+2, ...
        a, b = ranks[0].next(3), ranks[1].next(3)
        assert torch.equal(torch.stack([a, b], 1).flatten(), stream[6 * step:6 * step + 6])
    resumed = T.InfiniteSampler(10, seed=3, position=13)
    assert torch.equal(resumed.next(7), stream[13:20])


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def test_folder_with_class_subfolders(T, tmp_path):
    rng = np.random.default_rng(0)
    pictures = {}
    for cls in ("cat", "dog", "emu"):
        for i in range(2):
            pictures[f"{cls}/{i}.png"] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            write_png(str(tmp_path / cls / f"{i}.png"), pictures[f"{cls}/{i}.png"])
    data = T.load_dataset(T.parse_args(["--data", str(tmp_path), "--cond", "--cres", "1,2"]))
    assert (len(data), data.resolution, data.channels, data.label_dim) == (6, 8, 3, 3)
    for i, name in enumerate(sorted(pictures)):
        assert np.array_equal(data.images[i].permute(1, 2, 0).numpy(), pictures[name])
        assert data.labels[i].tolist() == [float(k == "cat dog emu".split().index(name[:3])) for k in range(3)]


def test_zip_with_dataset_json_labels_grayscale_and_xflip(T, tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i, a in enumerate(arrays):
            png = tmp_path / f"{i}.png"
            PIL.Image.fromarray(a).save(png)
            z.write(png, f"00000/img{i:08d}.png")
        z.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", [2, 0, 4][i]] for i in range(3)]}))
    data = T.load_dataset(T.parse_args(["--data", str(path), "--cond", "--xflip", "--cres", "1,2"]))
    assert (len(data), data.channels, data.label_dim) == (6, 1, 5)
    images, labels = data.batch(torch.tensor([0, 3, 5]))
    assert torch.equal(images[0, 0], torch.from_numpy(arrays[0]))
    assert torch.equal(images[1, 0], torch.from_numpy(arrays[0]).flip(1))   # index N + i = image i mirrored
    assert torch.equal(images[2, 0], torch.from_numpy(arrays[2]).flip(1))
    assert labels.argmax(1).tolist() == [2, 2, 4] and labels.sum().item() == 3


def test_built_in_shapes_are_labelled_and_deterministic(T):
    a, la = T.make_shapes_dataset(64, 16)
    b, lb = T.make_shapes_dataset(64, 16)
    assert torch.equal(a, b) and np.array_equal(la, lb)
    assert a.shape == (64, 3, 16, 16) and a.dtype == torch.uint8
    assert set(la.tolist()) == {0, 1, 2, 3}
    # A disc covers ~pi/4 of its bounding square; a square (0.8 half-width) fills its own.
    coverage = (a.float().amax(1) > 100).float().mean((1, 2))
    assert coverage[la == 1].mean() > coverage[la == 3].mean()          # squares are bigger than crosses


# ----------------------------------------------------------------------------
# Training runs (in-process; a few seconds each).

def test_tiny_run_loss_falls_and_the_snapshot_loads_and_samples(T, load, tmp_path, one_thread):
    out = tmp_path / "run"
    run(T, out, "--duration", 0.0016, "--tick", 0.4, "--snap", 1)
    lines = stats(out)
    assert len(lines) >= 4                                            # 4 ticks + the snapshot at 1 kimg
    assert lines[-1]["loss_mean"] < 0.8 * lines[0]["loss_mean"], [l["loss_mean"] for l in lines]
    assert all(l["nonfinite_grad_steps"] == 0 for l in lines)
    ch06, ch04 = load("06_unet"), load("04_stochastic_sampler")
    net = ch06.load_network(str(out / "network-snapshot-000001.pt"))
    ema = state(out / "training-state.pt")["ema"]
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ema[name]), name                 # the snapshot holds the EMA weights
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.eye(4)
    images = ch04.make_sampler(8)(net, latents, {"class_labels": labels})
    assert images.shape == (4, 3, 8, 8) and torch.isfinite(images).all()
    assert os.path.exists(out / "preview-000001.png") and os.path.exists(out / "training_options.json")


RESUME = ["--augment", 0.5, "--dropout", 0.1, "--batch-gpu", 8, "--duration", 0.000128, "--snap", 0.064,
          "--tick", 0.032, "--phema", "0.05,0.1"]                      # 8 steps, 2 accumulation rounds each


def assert_same_training_state(a, b, phema=2):
    for key in ("net", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert len(a["phema"]) == len(b["phema"]) == phema                # --phema's power-function EMAs, in order
    for k, (pa, pb) in enumerate(zip(a["phema"], b["phema"])):
        for name in pa:
            assert torch.equal(pa[name], pb[name]), ("phema", k, name)
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
    assert (a["cur_nimg"], a["stream_position"]) == (b["cur_nimg"], b["stream_position"])


def test_stop_and_resume_equals_the_uninterrupted_run_bit_for_bit(T, tmp_path, capsys, one_thread):
    run(T, tmp_path / "a", *RESUME, "--snap", 1)                     # snapshots do not perturb training
    reference = state(tmp_path / "a" / "training-state.pt")
    assert reference["cur_nimg"] == 128

    run(T, tmp_path / "b", *RESUME, "--stop-kimg", 0.096)            # stopped after 6 of 8 steps
    assert state(tmp_path / "b" / "training-state.pt")["cur_nimg"] == 96
    assert state(tmp_path / "b" / "training-state-prev.pt")["cur_nimg"] == 64
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    interrupted = state(tmp_path / "b" / "training-state.pt")
    assert not torch.equal(interrupted["net"]["model.enc.8x8_conv.weight"],
                           reference["net"]["model.enc.8x8_conv.weight"])

    run(T, tmp_path / "b", *RESUME, "--resume", "auto")
    assert_same_training_state(state(tmp_path / "b" / "training-state.pt"), reference)

    # A corrupt latest state: warn, continue from the previous good one, still land on the same weights.
    latest = tmp_path / "c" / "training-state.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    capsys.readouterr()
    run(T, tmp_path / "c", *RESUME, "--resume", "auto")
    assert "warning:" in capsys.readouterr().err
    assert_same_training_state(state(tmp_path / "c" / "training-state.pt"), reference)


# ----------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing written.

def make_folder(tmp_path, sizes=((8, 8),), garbage=False):
    folder = tmp_path / "imgs"
    for i, (w, h) in enumerate(sizes):
        write_png(str(folder / f"{i}.png"), np.zeros((h, w, 3), dtype=np.uint8))
    if garbage:
        (folder / "broken.png").write_bytes(b"not a png")
    return str(folder)


BAD = {
    "unknown dataset": (lambda p: ["--data", str(p / "nowhere")], "no such folder"),
    "unknown arch": (lambda p: ["--arch", "vit"], "invalid choice"),
    "cond without labels": (lambda p: ["--data", make_folder(p), "--cond"], "--cond needs labels"),
    "batch not divisible": (lambda p: ["--batch", "16", "--batch-gpu", "5"], "divisible"),
    "unreadable image": (lambda p: ["--data", make_folder(p, garbage=True), "--no-cond"], "cannot read image"),
    "mixed sizes": (lambda p: ["--data", make_folder(p, ((8, 8), (16, 16))), "--no-cond", "--no-resize"], "one size"),
    "resume path missing": (lambda p: ["--resume", str(p / "missing.pt")], "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_with_one_line_and_writes_nothing(T, tmp_path, case):
    make_args, fragment = BAD[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run(T, out, *make_args(tmp_path))
    message = str(exit_info.value.code)
    assert message.startswith("error:") and fragment in message and "\n" not in message
    assert not out.exists()


def test_an_existing_run_is_never_overwritten(T, tmp_path, one_thread):
    out = tmp_path / "run"
    run(T, out, "--duration", 0.000032, "--snap", 1)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(SystemExit) as exit_info:
        run(T, out, "--duration", 0.000032)
    assert "--resume auto" in str(exit_info.value.code)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_command_line_error_is_one_line_before_anything_is_written(T, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:        # a process prints this message to stderr and exits 1
        T.main(["--preset", "tiny", "--precond", "ddim"])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "--precond" in message and "\n" not in message, message
    assert capsys.readouterr().err == "" and not os.path.exists(tmp_path / "out")   # no usage dump, no files


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_augmented_training_runs_under_reduced_precision(T, tmp_path, one_thread, precision):
    # The paper's CIFAR-10 recipe augments (p = 0.12); under --precision bf16/fp16 its first step used to crash.
    run(T, tmp_path, "--augment", "0.5", "--precision", precision, "--duration", "0.000032")
    ticks = stats(tmp_path)
    assert ticks[-1]["kimg"] == 0.032 and np.isfinite(ticks[-1]["loss_mean"])
    assert any(name.startswith("network-snapshot-") for name in os.listdir(tmp_path))


# ----------------------------------------------------------------------------
# --precond fm (05's flow-matching column) and --loss-weighting learned (EDM2's u(sigma), inside the network), issue
# 31: their configuration reaches the loss, the network and the snapshot; they resume bit for bit and run under
# torchrun; 08 samples their snapshots through the standard D(x; sigma), seed for seed, with every sampler.

STEPS8 = ["--duration", "0.000128", "--snap", "0.064", "--tick", "0.064"]      # 8 steps of 16, two snapshots


def test_fm_and_learned_weighting_reach_loss_network_and_snapshot_config(T):
    fm = T.parse_args(SMALL + ["--precond", "fm"])
    assert (fm.P_mean, fm.P_std) == (0.0, 1.0)                                   # SD3's logit-normal t
    loss = T.loss_function(fm)
    assert type(loss).__name__ == "FMLoss" and (loss.P_mean, loss.P_std, loss.learned) == (0.0, 1.0, False)
    moved = T.loss_function(T.parse_args(SMALL + ["--precond", "fm", "--P-mean", "-1.2", "--P-std", "1.2"]))
    assert (moved.P_mean, moved.P_std) == (-1.2, 1.2)
    edm = T.parse_args(SMALL)
    assert (edm.P_mean, edm.P_std, edm.loss_weighting) == (-1.2, 1.2, "fixed")   # EDM's, unchanged
    data = T.load_dataset(fm)
    assert T.network_config(fm, data)[0] == "FMPrecond" and "sigma_data" not in T.network_config(fm, data)[1]
    for precond in ("edm", "fm"):
        args = T.parse_args(SMALL + ["--precond", precond, "--loss-weighting", "learned"])
        class_name, kwargs = T.network_config(args, data)
        assert kwargs["logvar_channels"] == 128 and T.loss_function(args).learned
    assert "logvar_channels" not in T.network_config(edm, data)[1]


BAD_COMBINATIONS = [   # each: one error line, nothing written
    (["--precond", "vp", "--loss-weighting", "learned"], "--loss-weighting learned is EDM2's weighting of the EDM "
                                                         "loss: --precond edm or fm, not vp"),
    (["--precond", "ve", "--loss-weighting", "learned"], "not ve"),
    (["--precond", "fm", "--sigma-data", "0.4"], "--sigma-data is EDM's constant; --precond fm's scalings have none"),
    (["--precond", "vp", "--P-mean", "0"], "--sigma-data, --P-mean and --P-std are EDM's constants"),
    (["--loss-weighting", "adaptive"], "invalid choice: 'adaptive'"),
]


@pytest.mark.parametrize("argv,fragment", BAD_COMBINATIONS, ids=[" ".join(a) for a, _ in BAD_COMBINATIONS])
def test_bad_combinations_are_one_error_line_and_write_nothing(T, tmp_path, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        run(T, tmp_path / "out", *argv)
    message = str(exit_info.value.code)
    assert message.startswith("error:") and fragment in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


def uninterrupted(T, outdir, options):
    """The reference: 8 steps of `options` without a stop; returns its final training state."""
    run(T, outdir, *options, *STEPS8)
    return state(outdir / "training-state.pt")


@pytest.mark.parametrize("options", [["--precond", "fm", "--loss-weighting", "learned"],    # FM's classes and u
                                     ["--precond", "edm", "--loss-weighting", "learned"]])
def test_fm_and_learned_weighting_stop_and_resume_bit_for_bit(T, tmp_path, options, one_thread):
    reference_dir = tmp_path / "a"
    reference = uninterrupted(T, reference_dir, options)
    run(T, tmp_path / "b", *options, *STEPS8, "--stop-kimg", 0.096)         # stopped after 6 of 8 steps
    assert state(tmp_path / "b" / "training-state.pt")["cur_nimg"] == 96
    run(T, tmp_path / "b", *options, *STEPS8, "--resume", "auto")
    assert_same_training_state(state(tmp_path / "b" / "training-state.pt"), reference, phema=0)
    learned = "learned" in options
    assert ("uncertainty.weight" in reference["net"]) == learned
    if learned:   # u(sigma) is trained by the same Adam: its weight moved, and the optimizer holds its moments
        net = load_snapshot(reference_dir)
        torch.manual_seed(0)     # the initial u of this seed: the weights after the network's own
        initial = T.ch06.from_official_config(net.init_config["class_name"], net.init_config["kwargs"])
        assert not torch.equal(initial.uncertainty.weight, reference["net"]["uncertainty.weight"])
        assert len(reference["optimizer"]["state"]) == len(list(initial.parameters()))
    # ... and a resume cannot switch the weighting or the preconditioning.
    switched = ["--loss-weighting", "fixed"] if learned else ["--precond", "edm"]
    with pytest.raises(SystemExit, match="cannot resume with different"):
        run(T, tmp_path / "b", *options, *STEPS8, *switched, "--resume", "auto")


def load_snapshot(run_dir):
    import common
    return common.load("06_unet").load_network(str(run_dir / "network-snapshot-000000.pt"))


def test_fm_snapshot_holds_the_configuration_and_u_and_08_samples_it_seed_for_seed(T, fid, tmp_path, one_thread):
    """The FM network is D(x; sigma) like any other (sigma_min 0, sigma_max inf): 08's default (04's Algorithm 2,
    here with churn), 09's solvers and 10's guidance sample its snapshot unchanged, each image a function of its seed."""
    import common
    fm_learned_run = tmp_path / "run"
    uninterrupted(T, fm_learned_run, ["--precond", "fm", "--loss-weighting", "learned"])
    net = load_snapshot(fm_learned_run)
    assert type(net).__name__ == "FMPrecond" and net.init_config["kwargs"]["logvar_channels"] == 128
    options = json.loads((fm_learned_run / "training_options.json").read_text())
    assert (options["precond"], options["loss_weighting"], options["P_mean"], options["P_std"]) == ("fm", "learned", 0, 1)
    ema = state(fm_learned_run / "training-state.pt")["ema"]
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ema[name]), name                   # u's weights too: the EMA's
    network = fm_learned_run / "network-snapshot-000000.pt"
    for k, options in enumerate([("--steps", 4, "--S_churn", 10), ("--solver", "ipndm", "--nfe", 6),
                                 ("--solver", "dpmpp2m", "--nfe", 6, "--guidance", 2)]):
        eight = pngs(fid, network, tmp_path / f"{k}b8", *options)
        three = pngs(fid, network, tmp_path / f"{k}b3", *options, batch=3)
        assert len(eight) == 8 and eight[0].shape == (8, 8, 3) and same_images(eight, three), options
        assert len({a.tobytes() for a in eight}) == 8
    # The default is Algorithm 2 on the network's range, as for an EDM network (official generate.py's order).
    net = fid.load_net(str(network), "cpu")
    rnd = common.StackedRandomGenerator("cpu", [0, 1, 2])
    latents, labels = rnd.randn([3, 3, 8, 8]), torch.eye(4)[rnd.randint(4, size=[3])]
    sigmas = common.edm_sigma_steps(18, net=net)
    assert float(sigmas[0]) == 80 and float(sigmas[-2]) == pytest.approx(0.002, rel=1e-12)   # EDM's range
    want = common.to_uint8(common.load("04_stochastic_sampler").edm_sampler(
        net, latents.to(torch.float64) * sigmas[0], sigmas, {"class_labels": labels}, randn_like=rnd.randn_like))
    assert same_images(pngs(fid, network, tmp_path / "default", seeds="0-2"), list(want.numpy()))


def pngs(fid, network, outdir, *options, batch=8, seeds="0-7"):
    import PIL.Image
    fid.main(["generate", "--network", str(network), "--seeds", seeds, "--batch", str(batch), "--outdir",
              str(outdir), "--device", "cpu", *map(str, options)])
    names = sorted(n for n in os.listdir(outdir) if n[:6].isdigit())
    return [np.array(PIL.Image.open(os.path.join(outdir, n))) for n in names]


def same_images(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_torchrun_two_ranks_train_fm_with_learned_weighting_to_identical_weights(T, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               T.__file__] + SMALL + [
        "--precond", "fm", "--loss-weighting", "learned", "--batch-gpu", "4", "--duration", "0.000064", "--snap",
        "0.032", "--tick", "0.032", "--outdir", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "stats.jsonl") as f:
        snapshots = [line for line in map(json.loads, f) if "rank_digests" in line]
    assert len(snapshots) == 2
    for line in snapshots:                          # the network, u and the EMA hash the same on both ranks
        assert len(line["rank_digests"]) == 2 and len(set(line["rank_digests"])) == 1, line["rank_digests"]
    assert "uncertainty.weight" in state(tmp_path / "run" / "training-state.pt")["net"]
