"""07 where the paper's runs run (issue 18): throughput in TFLOP/s and MFU, the multi-tensor gradient check, a
resume on another device type, and several nodes (two torchrun launchers on this machine, c10d rendezvous,
gloo): 07 trains with a shared run folder, refuses node-local ones, `08 generate` writes the images of
one process bit for bit, and `08 ref` merges the ranks' feature statistics into one process's."""
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "8",
         "--lr-rampup", "0.0002", "--device", "cpu"]


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def stats(outdir):
    with open(os.path.join(outdir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------
# The gradient check and the throughput figures.

def test_sanitize_gradients_counts_and_repairs_only_non_finite_entries(T):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for p in net.parameters():
        p.grad = torch.full_like(p, 1e30)                    # huge but finite: neither counted nor changed
    assert not T.sanitize_gradients(net)
    assert all(torch.equal(p.grad, torch.full_like(p, 1e30)) for p in net.parameters())
    grads = [p.grad for p in net.parameters()]
    grads[1][0], grads[3][1] = float("nan"), float("-inf")
    grads[2][0, 0] = float("inf")
    assert T.sanitize_gradients(net)
    assert grads[1][0] == 0 and grads[3][1] == -1e5 and grads[2][0, 0] == 1e5 and grads[2][0, 1] == 1e30


def test_peak_table_gives_mfu_only_for_known_gpus_and_precisions(T, monkeypatch):
    name = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name["gpu"])
    cuda = torch.device("cuda")
    for gpu, precision, tf32, peak in [("NVIDIA H100 80GB HBM3", "bf16", False, 989),
                                       ("NVIDIA H100 80GB HBM3", "fp32", True, 495),
                                       ("NVIDIA H100 80GB HBM3", "fp32", False, 67),
                                       ("NVIDIA H100 PCIe", "fp16", False, 756),
                                       ("NVIDIA H200", "bf16", False, 989),
                                       ("NVIDIA A100-SXM4-80GB", "fp16", False, 312),
                                       ("Tesla V100-SXM2-16GB", "bf16", False, None),   # no bf16 tensor cores
                                       ("NVIDIA H100 NVL", "bf16", False, None),
                                       ("NVIDIA GeForce GTX 1080", "fp32", False, None)]:
        name["gpu"] = gpu
        assert T.peak_tflops(cuda, precision, tf32) == peak, (gpu, precision, tf32)
    assert T.peak_tflops(torch.device("cpu"), "bf16", False) is None


@pytest.fixture(scope="module")
def tiny_run(T, tmp_path_factory):
    """4 steps of 8 images on the CPU, a tick every 2 steps; the run folder."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        T.main(SMALL + ["--duration", "0.000032", "--tick", "0.016", "--snap", "1", "--outdir", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def test_stats_report_tflops_per_gpu_as_images_per_second_times_training_flops(T, load, tiny_run):
    with open(tiny_run / "training_options.json") as f:
        network = json.load(f)["network"]
    forward = load("06_unet").size_and_flops(network["class_name"], network["kwargs"])[1]
    ticks = stats(tiny_run)
    assert len(ticks) == 2
    for tick in ticks:
        # One process: per GPU = all images/s; forward + backward = 3 x the forward FLOPs.
        assert tick["tflops_per_gpu"] == pytest.approx(tick["images_per_sec"] * 3 * forward / 1e12, rel=1e-9)
        assert tick["tflops_per_gpu"] > 0 and "mfu" not in tick          # a CPU has no tensor-core peak


def test_a_cuda_runs_state_resumes_on_the_cpu_with_fresh_random_streams(T, tiny_run, tmp_path, capsys):
    # What a GPU run saves: CUDA generators' states (16 bytes) for the augment stream and torch.cuda, fused Adam.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / T.STATE, weights_only=True)
    state["rng"] = [dict(r, augment=torch.zeros(16, dtype=torch.uint8), cuda=torch.zeros(16, dtype=torch.uint8))
                    for r in state["rng"]]
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True
    torch.save(state, run / T.STATE)
    capsys.readouterr()
    T.main(SMALL + ["--duration", "0.000048", "--augment", "0", "--tick", "0.016", "--snap", "1",
                    "--outdir", str(run), "--resume", "auto"])
    assert "resuming a cuda run on cpu" in capsys.readouterr().err
    assert stats(run)[-1]["kimg"] == 0.048 and np.isfinite(stats(run)[-1]["loss_mean"])


def test_each_process_tells_nccl_its_local_gpu(monkeypatch):
    # The second process of the second node (global rank 3): GPU 1 of its node, not GPU 3.
    import common
    joined = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.setdefault("set", device))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: joined.update(kw, backend=backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    for name, value in dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4").items():
        monkeypatch.setenv(name, value)
    rank, world_size, device = common.init_distributed("cuda")
    assert (rank, world_size, device, joined["set"]) == (3, 4, torch.device("cuda", 1), torch.device("cuda", 1))
    assert joined["backend"] == "nccl" and joined.get("device_id") == torch.device("cuda", 1), joined


# ----------------------------------------------------------------------------
# Several nodes: two torchrun launchers on this machine, one process each, meeting at a c10d rendezvous.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(script, args_of_node, cwd, timeout=300):
    """Run `script` under two launchers (--nnodes 2, node ranks 0 and 1); node i gets args_of_node(i).
    Returns [(exit status, output)] per node."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         os.path.join(ROOT, script), *map(str, args_of_node(node))],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    try:
        return [(p.wait(timeout), p.stdout.read()) for p in launchers]
    finally:
        for p in launchers:
            p.kill()


@pytest.fixture(scope="module")
def multi_node(tmp_path_factory):
    """07 trained on two 'nodes' into one shared run folder (4 steps of 8 = 2 ranks x 4 images)."""
    tmp = tmp_path_factory.mktemp("nodes")
    train = SMALL + ["--duration", "0.000032", "--snap", "1", "--outdir", tmp / "shared"]
    return tmp, two_nodes("07_train_cifar10.py", lambda node: train, tmp)


@pytest.mark.slow
def test_two_nodes_train_into_a_shared_run_folder(multi_node):
    tmp, results = multi_node
    for status, output in results:
        assert status == 0, output[-3000:]
    (tick,) = stats(tmp / "shared")
    assert tick["kimg"] == 0.032 and len(tick["rank_digests"]) == 2 and len(set(tick["rank_digests"])) == 1
    with open(tmp / "shared" / "training_options.json") as f:
        assert json.load(f)["world_size"] == 2


@pytest.mark.slow
def test_resume_on_two_nodes_refuses_node_local_run_folders(multi_node):
    tmp, _ = multi_node
    # Node 1 looks into its own empty folder: it would start over while node 0 resumes.
    resume = lambda node: SMALL + ["--duration", "0.000048", "--resume", "auto",
                                   "--outdir", tmp / ("shared" if node == 0 else "local1")]
    for status, output in two_nodes("07_train_cifar10.py", resume, tmp):
        assert status != 0 and "error: the processes see different training runs" in output, output[-3000:]
        assert "must be one shared folder" in output
    assert stats(tmp / "shared")[-1]["kimg"] == 0.032                 # nothing was trained or overwritten


@pytest.mark.slow
def test_08_generate_on_two_nodes_writes_one_process_images_bit_for_bit(multi_node, load):
    tmp, _ = multi_node
    (snapshot,) = sorted((tmp / "shared").glob("network-snapshot-*.pt"))
    generate = ["generate", "--network", snapshot, "--seeds", "0-6", "--batch", 2, "--steps", 4,
                "--S_churn", 10, "--device", "cpu"]
    results = two_nodes("08_evaluate_fid.py", lambda node: generate + ["--outdir", tmp / "gen2"], tmp)
    assert all(status == 0 for status, _ in results), results
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load("08_evaluate_fid").main([str(a) for a in generate + ["--outdir", tmp / "gen1"]])
    finally:
        torch.set_num_threads(threads)
    seed_pngs = lambda folder: sorted(n for n in os.listdir(folder) if n[:6].isdigit())   # not grid.png, settings
    names = seed_pngs(tmp / "gen1")
    assert names == seed_pngs(tmp / "gen2") == [f"{s:06d}.png" for s in range(7)]
    (settings,) = json.loads((tmp / "gen2" / "generation.json").read_text())      # rank 0 records the 2 processes
    assert settings["gpus"] == 2 and (tmp / "gen2" / "grid.png").is_file()
    for name in names:
        one, two = (np.array(PIL.Image.open(tmp / d / name)) for d in ("gen1", "gen2"))
        assert np.array_equal(one, two), name


@pytest.mark.slow
def test_08_ref_on_two_nodes_counts_every_image_once(load, tmp_path):
    # The FID statistics' all_reduce for real (gloo): 7 images in batches of 2 over two processes, whose
    # merged mean and covariance must be one process's (an image counted twice or never moves the mean).
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import standin_detector                                # 08's detector interface, 2048 features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # "torch.jit is deprecated": 08 reads TorchScript detectors
        standin_detector.save(tmp_path / "det.pt")
    pixels = np.random.RandomState(0).randint(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "images")
    for i, image in enumerate(pixels):
        PIL.Image.fromarray(image).save(tmp_path / "images" / f"{i:06d}.png")
    ref = ["ref", "--data", tmp_path / "images", "--detector", tmp_path / "det.pt", "--batch", 2, "--device", "cpu",
           "--dest", tmp_path / "ref2.npz"]
    results = two_nodes("08_evaluate_fid.py", lambda node: ref, tmp_path)
    assert all(status == 0 for status, _ in results), results
    fid = load("08_evaluate_fid")
    mu, sigma = fid.image_stats(fid.ImageFolder(str(tmp_path / "images")), np.arange(7),
                                fid.load_detector(str(tmp_path / "det.pt"), "cpu"), 7, "cpu")
    two = np.load(tmp_path / "ref2.npz")
    np.testing.assert_allclose(two["mu"], mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(two["sigma"], sigma, rtol=1e-9, atol=1e-12)
