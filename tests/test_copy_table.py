"""The README's promises about the files themselves.

* Copy table: each row's files, copied alone into an empty folder, give what the row says
  (a short program imports them there and uses the named code on a case with a known answer).
* A chapter whose predecessor is missing fails at import, naming the file to copy.
* Paper -> code index: every `file:name` the README maps an equation/algorithm/table to exists.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# What every row's program starts with: the copied folder alone is on the path.
PRELUDE = """
import sys, math
import torch
import common

class Gaussian:
    '''Exact denoiser of N(0, s^2 I) data: D(x; sigma) = s^2 / (s^2 + sigma^2) x (a network stand-in).'''
    sigma_min, sigma_max, s = 0.002, 80.0, 0.5
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return self.s ** 2 / (self.s ** 2 + sigma ** 2) * x

def check_std(x, s=0.5, tol=0.05):
    std = float(x.std())
    assert abs(std - s) < tol, f"sample std {std:.4f}, expected {s}"
"""

# row key -> (files to copy, program using them). Each program checks a known answer.
ROWS = {
    "edm_sampler": (["04_stochastic_sampler.py"], """
        m = common.load("04_stochastic_sampler")
        torch.manual_seed(0)
        latents = torch.randn(4000, 1, dtype=torch.float64)
        sigmas = common.edm_sigma_steps(18)                     # Eq. 5, then 0
        x = m.edm_sampler(Gaussian(), latents * sigmas[0], sigmas)   # Algorithm 2, deterministic setting
        check_std(x)
        class Float32Gaussian(torch.nn.Module):   # a plain float32 network: fails on float64 inputs
            def __init__(self):
                super().__init__()
                self.s = torch.nn.Parameter(torch.tensor(0.5))
            def forward(self, x, sigma, class_labels=None):
                assert x.dtype == sigma.dtype == torch.float32, (x.dtype, sigma.dtype)
                return self.s ** 2 / (self.s ** 2 + sigma ** 2) * x
        y = m.make_sampler(18)(Float32Gaussian(), latents)     # the same from unit latents
        assert y.dtype == torch.float64 and (y - x).abs().max() < 1e-4, float((y - x).abs().max())
    """),
    "ablation_sampler": (["03_heun_and_schedules.py", "02_ode_sampler.py"], """
        m = common.load("03_heun_and_schedules")
        torch.manual_seed(0)
        latents = torch.randn(4000, 1, dtype=torch.float64)
        for disc in ["vp", "ve", "iddpm", "edm"]:
            sigmas = m.sigma_steps(disc, 32)
            check_std(m.ablation_sampler(Gaussian(), latents * sigmas[0], sigmas, solver="heun"))
    """),
    "preconditioning": (["05_preconditioning.py"], """
        m = common.load("05_preconditioning")
        class Zero(torch.nn.Module):   # F = 0: D = c_skip x, so the EDM loss at sigma is lambda c_skip-error
            def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
                return torch.zeros_like(x)
        net = m.EDMPrecond(Zero(), img_resolution=4, img_channels=1, label_dim=0)
        sigma = torch.tensor([1.0])
        x = torch.ones(1, 1, 4, 4)
        c_skip = 0.5 ** 2 / (1.0 + 0.5 ** 2)                            # Table 1: sigma_data^2 / (sigma^2 + sigma_data^2)
        assert torch.allclose(net(x, sigma), c_skip * x)
        loss = m.EDMLoss()(net, torch.zeros(8, 1, 4, 4))
        assert loss.shape == (8, 1, 4, 4) and torch.isfinite(loss).all()
    """),
    "networks": (["06_unet.py", "05_preconditioning.py"], """
        m = common.load("06_unet")
        torch.manual_seed(0)
        net = m.from_official_config("EDMPrecond", dict(img_resolution=8, img_channels=3, label_dim=0,
            model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], embedding_type="positional", encoder_type="standard", decoder_type="standard",
            channel_mult_noise=1, resample_filter=[1, 1])).eval()
        x = torch.randn(2, 3, 8, 8)
        y = net(x, torch.tensor([0.5, 2.0]))
        m.save_network(net, "net.pt")
        again = m.load_network("net.pt")
        assert torch.equal(again.eval()(x, torch.tensor([0.5, 2.0])), y), "snapshot round trip changed the output"
    """),
    "training": (["07_train_cifar10.py", "06_unet.py", "05_preconditioning.py", "04_stochastic_sampler.py"], """
        import glob
        torch.set_num_threads(1)
        train = common.load("07_train_cifar10")
        train.main(["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
                    "--duration", "0.000064", "--snap", "1", "--outdir", "run", "--device", "cpu"])
        (snapshot,) = glob.glob("run/network-snapshot-*.pt")
        net = common.load("06_unet").load_network(snapshot)
        x = common.load("04_stochastic_sampler").make_sampler(4)(net, torch.randn(2, 3, 8, 8))
        assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    """),
    "fid_only": (["08_evaluate_fid.py"], """
        import numpy as np, PIL.Image, os
        fid = common.load("08_evaluate_fid")
        a = np.random.RandomState(0).randn(500, 3)
        s = fid.FeatureStats(3)
        s.update(torch.as_tensor(a))
        mu, cov = s.mean_cov()
        assert abs(fid.frechet_distance(mu, cov, mu + 1.0, cov) - 3.0) < 1e-9   # |mu1 - mu2|^2 with equal covariances
        os.makedirs("imgs/cats")
        os.makedirs("imgs/dogs")
        for i in range(4):
            PIL.Image.fromarray(np.full([4, 4, 3], 60 * i, np.uint8)).save(f"imgs/{['cats', 'dogs'][i % 2]}/{i}.png")
        images = fid.open_images("imgs", None)                               # calc's and ref's reader
        assert len(images) == 4 and images.batch([3]).shape == (1, 3, 4, 4) 
        fid.main(["demo", "--outdir", "demo", "--device", "cpu"])
        assert os.path.isfile("demo/fid_vs_n.png")
        try:                                            # 07's shapes are drawn by 07: one line naming it
            fid.main(["ref", "--data", "shapes", "--dest", "shapes.npz", "--device", "cpu"])
        except SystemExit as e:
            assert str(e.code).startswith("error: ") and "07_train_cifar10.py" in str(e.code), e.code
        else:
            raise AssertionError("ref --data shapes ran without 07")
        assert sorted(m for m in sys.modules if m[:2].isdigit()) == ["08_evaluate_fid"]
    """),
    "generation": (["08_evaluate_fid.py", "06_unet.py", "05_preconditioning.py", "04_stochastic_sampler.py"], """
        import os
        fid = common.load("08_evaluate_fid")
        torch.manual_seed(0)
        net = common.load("06_unet").from_official_config("EDMPrecond", dict(img_resolution=8, img_channels=3,
            label_dim=0, model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[], embedding_type="positional", encoder_type="standard", decoder_type="standard",
            channel_mult_noise=1, resample_filter=[1, 1]))
        common.load("06_unet").save_network(net, "net.pt")
        fid.main(["generate", "--network", "net.pt", "--seeds", "0-2", "--steps", "3", "--outdir", "imgs",
                  "--device", "cpu"])
        assert sorted(os.listdir("imgs")) == ["000000.png", "000001.png", "000002.png", "generation.json", "grid.png"]
        # A flag whose chapter is not here: one error line naming the file to copy, nothing written.
        for flags, missing in ((["--solver", "ipndm"], "09_fast_samplers.py"), (["--disc", "vp"], "03_heun_and_schedules.py"),
                               (["--guidance", "2"], "10_guidance.py")):
            try:
                fid.main(["generate", "--network", "net.pt", "--seeds", "0", "--outdir", "more", "--device", "cpu", *flags])
            except SystemExit as e:
                message = str(e.code)
            else:
                raise AssertionError(f"{flags} ran without {missing}")
            assert message.startswith("error: ") and missing in message and len(message.splitlines()) == 1, message
            assert not os.path.exists("more"), f"{flags}: wrote images before failing"
    """),
    "fast_samplers": (["09_fast_samplers.py"], """
        m = common.load("09_fast_samplers")
        torch.manual_seed(0)
        sigmas = m.sigma_steps("logsnr", 10, 0.002, 80.0)
        D = Gaussian()
        x = m.sample_dpmpp_2m(D, torch.randn(4000, 1, dtype=torch.float64) * 80.0, sigmas)
        check_std(x)
    """),
    "guidance": (["10_guidance.py"], """
        m = common.load("10_guidance")
        D = Gaussian()
        x = torch.randn(5, 1, dtype=torch.float64)
        guided = m.GuidedDenoiser(D, D, w=3.0)
        assert torch.equal(guided(x, torch.full([5], 2.0, dtype=torch.float64)), D(x, torch.full([5], 2.0)))
    """),
    "post_hoc_ema": (["11_post_hoc_ema.py"], """
        import os
        m = common.load("11_post_hoc_ema")
        stored = [(t, m.phema_gamma(s)) for t in (1e3, 2e3) for s in (0.05, 0.10)]
        c, error = m.solve_coefficients(stored, stored[3])               # a stored profile: itself, exactly
        assert abs(c[3] - 1) < 1e-7 and error < 1e-6, (c, error)
        torch.manual_seed(0)
        snapshot = {"format": "edm-tutorial-network-v1", "class_name": "EDMPrecond",   # 06's save_network format
                    "kwargs": {"img_resolution": 8}, "state_dict": {"w": torch.randn(3, 4), "b": torch.randn(4)}}
        os.makedirs("run")
        for s in (0.05, 0.1):                                             # two profiles of one constant trajectory
            torch.save(snapshot, m.phema_path("run", s, 2000))
        rebuilt, used, c, error = m.reconstruct("run", 0.07)
        assert len(used) == 2 and abs(c.sum() - 1) < 1e-9
        for name, tensor in snapshot["state_dict"].items():               # any average of equal weights is them
            assert torch.allclose(rebuilt["state_dict"][name], tensor, atol=1e-6)
        m.main(["--run", "run", "--sigma-rel", "0.07", "--out", "ema.pt"])
        meta = lambda d: {k: v for k, v in d.items() if k != "state_dict"}
        assert meta(torch.load("ema.pt", weights_only=True)) == meta(snapshot)   # the same format: 08 reads it
        assert sorted(name for name in sys.modules if name[:2].isdigit()) == ["11_post_hoc_ema"]
    """),
    "consistency_models": (["12_consistency_models.py", "06_unet.py", "05_preconditioning.py"], """
        m, ch06 = common.load("12_consistency_models"), common.load("06_unet")
        torch.manual_seed(0)
        D = ch06.from_official_config("EDMPrecond", dict(img_resolution=8, img_channels=3, label_dim=0,
            model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
            embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
            resample_filter=[1, 1]))
        f = m.from_diffusion(D)                                           # ECT's start: D's weights, the boundary
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(f(x, f.sigma_min), x)                      # f(x, sigma_min) = x, to the bit
        ch06.save_network(f, "f.pt")
        assert type(ch06.load_network("f.pt")).__name__ == "ConsistencyPrecond"   # 06 builds 12's class by name
        loss = m.ECTLoss(f.sigma_min)(f.train(), torch.zeros(4, 3, 8, 8))
        assert loss.shape == (4, 1, 1, 1) and torch.isfinite(loss).all()
        class ExactFlow(Gaussian):   # N(0, s^2) data: the ODE keeps x / sqrt(s^2 + sigma^2), so f* is a rescaling
            sigma_min = 0.002
            def __call__(self, x, sigma, class_labels=None):
                return x * math.sqrt(self.s ** 2 + self.sigma_min ** 2) / (self.s ** 2 + float(sigma) ** 2) ** 0.5
        latents = torch.randn(4000, 1, dtype=torch.float64)
        for steps in (1, 2, 3):                                           # Algorithm 1 with the exact f
            check_std(m.make_sampler(steps)(ExactFlow(), latents))
        assert sorted(name for name in sys.modules if name[:2].isdigit()) == ["05_preconditioning", "06_unet",
                                                                             "12_consistency_models"]
    """),
}


def start_row(folder, files, program):
    """Copy `files` + common.py alone into `folder` and start `program` there (a process, not waited for)."""
    for name in files + ["common.py"]:
        shutil.copy(os.path.join(ROOT, name), folder / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(program)], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Every row's program and the missing-predecessor case, started together (each process spends most of its
    time importing torch, so they share the cores); finished(name) waits for one: (return code, stderr)."""
    cases = dict(ROWS, missing_predecessor=(["06_unet.py"], 'common.load("06_unet")'))
    procs = {name: start_row(tmp_path_factory.mktemp(name), files, program) for name, (files, program) in cases.items()}

    def wait(name):
        stderr = procs[name].communicate(timeout=300)[1]
        return procs[name].returncode, stderr
    yield wait
    for proc in procs.values():
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("row", list(ROWS))
def test_copy_row_works_alone(finished, row):
    returncode, stderr = finished(row)
    assert returncode == 0, f"row {row!r} with only {ROWS[row][0]} + common.py:\n{stderr[-3000:]}"


def test_missing_predecessor_fails_at_import_naming_the_file(finished):
    returncode, stderr = finished("missing_predecessor")
    assert returncode != 0
    assert "05_preconditioning.py is missing" in stderr, stderr[-2000:]


def test_no_chapter_imports_a_later_one_at_import_time():
    """Each chapter, imported alone (no chapter loaded before it), loads only earlier chapters; 08 loads none."""
    sys.path.insert(0, ROOT)
    import common
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(ROOT) if re.fullmatch(r"\d\d_\w+\.py", f))
    chapters = lambda: sorted(m for m in sys.modules if m in names)
    saved = {m: sys.modules.pop(m) for m in chapters()}
    try:
        for name in names:
            for m in chapters():
                del sys.modules[m]
            common.load(name)
            later = [m for m in chapters() if m > name]
            assert not later, f"importing {name}.py loaded the later chapter(s) {later}"
        for m in chapters():
            del sys.modules[m]
        common.load("08_evaluate_fid")
        assert chapters() == ["08_evaluate_fid"], f"importing 08 loaded {chapters()}: FID must need common.py alone"
    finally:
        for m in chapters():
            del sys.modules[m]
        sys.modules.update(saved)


def readme_copy_table():
    """Rows of the README's Copy table: (what, [files]) with files named like `04_stochastic_sampler.py`."""
    text = open(README).read()
    section = text.split("## Copy", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.split("|")
        files = re.findall(r"`(\d\d_\w+\.py|common\.py)`", cells[2]) if len(cells) > 3 else []
        if files:
            rows.append((line, files))
    return rows


def test_readme_copy_table_matches_the_tested_rows():
    """Every README row names exactly the files its test copies (plus common.py), and its line count is right."""
    rows = readme_copy_table()
    tested = {tuple(sorted(files + ["common.py"])) for files, _ in ROWS.values()}
    for line, files in rows:
        if tuple(sorted(files)) in tested:
            count = sum(len(open(os.path.join(ROOT, f)).readlines()) for f in files)
            assert re.search(rf"\b{count:,}\b|\b{count}\b", line), f"README row should state {count} lines: {line}"
    assert tested <= {tuple(sorted(f)) for _, f in rows}, "a tested row is missing from the README's Copy table"


def test_paper_index_names_exist():
    """README's 'Paper -> code' table: every `NN_file.py:name` (name may be dotted) exists."""
    sys.path.insert(0, ROOT)
    import common
    text = open(README).read()
    section = text.split("## Paper", 1)[1].split("\n## ", 1)[0]
    refs = re.findall(r"`(\d\d_\w+|common)\.py:([\w.]+)`", section)
    assert len(refs) >= 12, "the paper -> code index should map every equation, algorithm and table"
    for module_name, name in refs:
        obj = common.load(module_name) if module_name != "common" else common
        for part in name.split("."):
            assert hasattr(obj, part), f"README names {module_name}.py:{name}, which does not exist"
            obj = getattr(obj, part)
