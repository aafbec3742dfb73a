"""The GPU paths, checked against the CPU and the official outputs: EDM_TEST_DEVICE=cuda python -m pytest
tests/test_device.py (tests/conftest.py; unset, these skip with the reason, and CUDA on a machine without one
skips too -- never a silent pass). Tolerances, all stated against the CPU's float32/float64 results:
  * network forward, fp32 with TF32 off: 1e-4 of each output's largest entry (the CPU test asks 1e-5; GPU
    kernels sum in other orders); bf16 autocast: 5e-2, as on the CPU;
  * loss gradient through the network: relative L2 error 1e-3;
  * sampler: float64 with an exact Gaussian denoiser, 1e-12; the reference DDPM++ network, 18 Heun steps,
    1e-3 of the largest output value (TF32 off);
  * generation per seed, across batch sizes on the device: PNG values within 1 level (cuDNN may pick other
    kernels for other batch shapes, which moves a value across a rounding boundary), on < 1 % of the values;
  * FID chain: reference statistics (TF32 convolutions, cuDNN's default) within 2e-3 of the largest mean /
    covariance entry; `calc` of the same images against the CPU reference at most 1e-4 x tr(Sigma).
"""
import json
import os
import re
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from test_06_unet import REFERENCES, read_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import standin_detector  # noqa: E402  (the FID chain's detector: tools/, shared with gpu_check.sh)


@pytest.fixture
def fp32(device):
    """True float32 on the device (no TF32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield device
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(device, inputs):
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


def max_relative(out, ref):
    """Per sample: max |out - ref| / max |ref|."""
    return ((out.cpu().float() - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1)).max().item()


@pytest.mark.parametrize("name", REFERENCES)
def test_networks_reproduce_the_official_outputs_on_the_device(load, fp32, name):
    class_name, config, state, inputs, ref = read_reference(name)
    net = load("06_unet").from_official_config(class_name, config).eval()
    net.load_state_dict(state)
    net.to(fp32)
    with torch.no_grad():
        assert max_relative(net(**on(fp32, inputs)), ref) <= 1e-4
        with torch.autocast(fp32.type, dtype=torch.bfloat16):
            assert max_relative(net(**on(fp32, inputs)), ref) <= 5e-2


def test_edm_loss_draws_p_train_and_its_gradient_matches_the_cpu(load, fp32):
    precond = load("05_preconditioning")
    loss_fn = precond.EDMLoss()
    # The draws, closed form: with D(x) = x the loss is lambda(sigma) sigma^2 z^2, z ~ N(0, 1), and
    # ln sigma ~ N(-1.2, 1.2^2).
    images = torch.zeros(20000, 1, 2, 2, device=fp32)
    seen = {}
    identity = lambda x, sigma, labels, augment_labels=None: seen.setdefault("sigma", sigma) * 0 + x
    loss = loss_fn(identity, images)
    sigma = seen["sigma"].flatten().double()
    z2 = (loss / (loss_fn.weight(seen["sigma"]) * seen["sigma"] ** 2)).double()
    n = len(sigma)
    assert abs(sigma.log().mean().item() + 1.2) < 4.5 * 1.2 / n ** 0.5
    assert abs(sigma.log().std().item() - 1.2) < 4.5 * 1.2 / (2 * n) ** 0.5
    assert abs(z2.mean().item() - 1) < 4.5 * 2 ** 0.5 / (4 * n) ** 0.5
    # The weighted loss through a real network for fixed y, sigma, n: the gradient on the device = on the CPU.
    class_name, config, state, inputs, _ = read_reference("ddpmpp_edm_cond_aug")
    grads = []
    for device in (torch.device("cpu"), fp32):
        net = load("06_unet").from_official_config(class_name, config).eval().to(device)
        net.load_state_dict(state)
        x = on(device, inputs)
        sigma = x["sigma"].view(-1, 1, 1, 1)
        noise = torch.linspace(-1, 1, x["x"].numel()).view_as(x["x"]).to(device)
        D = net(x["x"] + noise * sigma, x["sigma"], x["class_labels"], augment_labels=x["augment_labels"])
        (loss_fn.weight(sigma) * (D - x["x"]) ** 2).mean().backward()
        grads.append(torch.cat([p.grad.flatten().cpu().double() for p in net.parameters()]))
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() <= 1e-3


def test_sampler_on_the_device_equals_the_cpu(load, fp32):
    sampler = load("04_stochastic_sampler")
    latents = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # An exact denoiser for data ~ N(0, 0.5^2 I): D = x sigma_d^2 / (sigma_d^2 + sigma^2).
    gaussian = lambda x, sigma, labels=None: x * 0.25 / (0.25 + sigma ** 2)
    cpu, dev = (sampler.make_sampler()(gaussian, latents.to(d)).cpu() for d in ("cpu", fp32))
    torch.testing.assert_close(dev, cpu, rtol=1e-12, atol=1e-12)
    # A real network (official-layout DDPM++ with the reference weights).
    class_name, config, state, inputs, _ = read_reference("ddpmpp_edm_cond_aug")
    net = load("06_unet").from_official_config(class_name, config).eval()
    net.load_state_dict(state)
    r = config["img_resolution"]
    latents = torch.randn(4, config["img_channels"], r, r, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = [sampler.make_sampler()(net.to(d), latents.to(d), {"class_labels": inputs["class_labels"].to(d)}).cpu()
               for d in ("cpu", fp32)]
    assert (out[1] - out[0]).abs().max().item() <= 1e-3 * out[0].abs().max().item()


def run07(T, outdir, device, *extra):
    T.main(["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
            "--duration", "0.000064", "--snap", "1", "--outdir", str(outdir), "--device", str(device),
            *map(str, extra)])
    with open(os.path.join(outdir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_augmented_training_steps_on_the_device(load, device, tmp_path, precision):
    T = load("07_train_cifar10")
    (tick,) = run07(T, tmp_path / "run", device, "--augment", 0.5, "--precision", precision)
    assert tick["kimg"] == 0.064 and np.isfinite(tick["loss_mean"])
    # fp16's loss scale starts at 2^16 and halves on each overflowing step (skipped); the others never overflow.
    assert tick["nonfinite_grad_steps"] == 0 or precision == "fp16"
    assert tick["tflops_per_gpu"] > 0
    if device.type == "cuda" and T.peak_tflops(device, precision, False):
        assert 0 < tick["mfu"] < 1


def test_a_cpu_run_resumes_on_the_device(load, device, tmp_path, capsys):
    T = load("07_train_cifar10")
    run07(T, tmp_path, "cpu", "--stop-kimg", 0.032)
    capsys.readouterr()
    ticks = run07(T, tmp_path, device, "--resume", "auto")
    assert ticks[-1]["kimg"] == 0.064 and np.isfinite(ticks[-1]["loss_mean"])
    if device.type != "cpu":
        assert "resuming a cpu run on cuda" in capsys.readouterr().err


@pytest.fixture(scope="module")
def snapshot(load, tmp_path_factory):
    out = tmp_path_factory.mktemp("net")
    run07(load("07_train_cifar10"), out, "cpu")
    return str(next(out.glob("network-snapshot-*.pt")))


def pngs(folder):
    """generate's {seed:06d}.png images (not its grid.png and generation.json), by name."""
    return {n: np.array(PIL.Image.open(os.path.join(folder, n))).astype(int) for n in sorted(os.listdir(folder))
            if n[:6].isdigit()}


def test_generated_images_depend_on_the_seed_only_on_the_device(load, device, snapshot, tmp_path):
    fid = load("08_evaluate_fid")
    for batch in (8, 3):
        fid.main(["generate", "--network", snapshot, "--seeds", "0-7", "--batch", str(batch), "--S_churn", "10",
                  "--outdir", str(tmp_path / f"b{batch}"), "--device", str(device)])
    a, b = pngs(tmp_path / "b8"), pngs(tmp_path / "b3")
    assert list(a) == list(b) == [f"{s:06d}.png" for s in range(8)]
    diff = np.stack([np.abs(a[n] - b[n]) for n in a])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_fid_chain_on_the_device_equals_the_cpu(load, device, tmp_path, capsys):
    fid = load("08_evaluate_fid")
    rng = np.random.default_rng(0)
    for i in range(40):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    detector = str(tmp_path / "det.pt")
    standin_detector.save(detector)
    refs = {}
    for d in ("cpu", str(device)):
        dest = str(tmp_path / f"ref-{d.replace(':', '')}.npz")
        fid.main(["ref", "--data", str(tmp_path), "--dest", dest, "--detector", detector, "--device", d])
        refs[d] = np.load(dest)
    cpu, dev = refs["cpu"], refs[str(device)]
    for key in ("mu", "sigma"):
        assert np.abs(dev[key] - cpu[key]).max() <= 2e-3 * np.abs(cpu[key]).max(), key
    capsys.readouterr()
    fid.main(["calc", "--images", str(tmp_path), "--ref", str(tmp_path / "ref-cpu.npz"), "-n", "40",
              "--detector", detector, "--device", str(device)])
    value = float(re.search(r"FID (\S+)", capsys.readouterr().out).group(1))
    assert value <= 1e-4 * np.trace(cpu["sigma"])
