"""07 --precond fm (05's flow-matching column) and --loss-weighting learned (EDM2's u(sigma), inside the network):
their configuration reaches the loss, the network and the snapshot; they resume bit for bit and run under torchrun;
08 samples their snapshots through the standard D(x; sigma), seed for seed, with every sampler (issue 31)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
         "--lr-rampup", "0.0002", "--device", "cpu"]
STEPS8 = ["--duration", "0.000128", "--snap", "0.064", "--tick", "0.064"]      # 8 steps of 16, two snapshots


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def run(T, outdir, *extra):
    T.main(SMALL + ["--outdir", str(outdir)] + [str(e) for e in extra])


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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


BAD = [   # each: one error line, nothing written
    (["--precond", "vp", "--loss-weighting", "learned"], "--loss-weighting learned is EDM2's weighting of the EDM "
                                                         "loss: --precond edm or fm, not vp"),
    (["--precond", "ve", "--loss-weighting", "learned"], "not ve"),
    (["--precond", "fm", "--sigma-data", "0.4"], "--sigma-data is EDM's constant; --precond fm's scalings have none"),
    (["--precond", "vp", "--P-mean", "0"], "--sigma-data, --P-mean and --P-std are EDM's constants"),
    (["--loss-weighting", "adaptive"], "invalid choice: 'adaptive'"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_combinations_are_one_error_line_and_write_nothing(T, tmp_path, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        run(T, tmp_path / "out", *argv)
    message = str(exit_info.value.code)
    assert message.startswith("error:") and fragment in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


def same_state(a, b):
    for key in ("net", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
    assert (a["cur_nimg"], a["stream_position"]) == (b["cur_nimg"], b["stream_position"])


@pytest.fixture(scope="module")
def fm_learned_run(T, tmp_path_factory):
    """--precond fm --loss-weighting learned, 8 steps: the uninterrupted run (its folder)."""
    out = tmp_path_factory.mktemp("fm_learned") / "a"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(T, out, "--precond", "fm", "--loss-weighting", "learned", *STEPS8)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("options", [["--precond", "fm", "--loss-weighting", "learned"],    # FM's classes and u
                                     ["--precond", "edm", "--loss-weighting", "learned"]])
def test_stop_and_resume_equals_the_uninterrupted_run_bit_for_bit(T, fm_learned_run, tmp_path, options, one_thread):
    if options == ["--precond", "fm", "--loss-weighting", "learned"]:
        reference_dir = fm_learned_run
    else:
        reference_dir = tmp_path / "a"
        run(T, reference_dir, *options, *STEPS8)
    reference = state(reference_dir / "training-state.pt")
    run(T, tmp_path / "b", *options, *STEPS8, "--stop-kimg", 0.096)         # stopped after 6 of 8 steps
    assert state(tmp_path / "b" / "training-state.pt")["cur_nimg"] == 96
    run(T, tmp_path / "b", *options, *STEPS8, "--resume", "auto")
    same_state(state(tmp_path / "b" / "training-state.pt"), reference)
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


def test_snapshot_holds_the_configuration_and_u(fm_learned_run):
    net = load_snapshot(fm_learned_run)
    assert type(net).__name__ == "FMPrecond" and net.init_config["kwargs"]["logvar_channels"] == 128
    options = json.loads((fm_learned_run / "training_options.json").read_text())
    assert (options["precond"], options["loss_weighting"], options["P_mean"], options["P_std"]) == ("fm", "learned", 0, 1)
    ema = state(fm_learned_run / "training-state.pt")["ema"]
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, ema[name]), name                   # u's weights too: the EMA's


def pngs(fid, network, outdir, *options, batch=8, seeds="0-7"):
    import PIL.Image
    fid.main(["generate", "--network", str(network), "--seeds", seeds, "--batch", str(batch), "--outdir",
              str(outdir), "--device", "cpu", *map(str, options)])
    names = sorted(n for n in os.listdir(outdir) if n[:6].isdigit())
    return [np.array(PIL.Image.open(os.path.join(outdir, n))) for n in names]


def same_images(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_08_samples_the_fm_snapshot_seed_for_seed_with_every_sampler(fid, fm_learned_run, tmp_path, one_thread):
    """The FM network is D(x; sigma) like any other (sigma_min 0, sigma_max inf): 08's default (04's Algorithm 2,
    here with churn), 09's solvers and 10's guidance sample it unchanged, each image a function of its seed."""
    import common
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


@pytest.mark.slow
def test_torchrun_two_ranks_train_fm_with_learned_weighting_to_identical_weights(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "07_train_cifar10.py")] + SMALL + [
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
