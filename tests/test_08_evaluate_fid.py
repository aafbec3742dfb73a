"""Tests for 08_evaluate_fid.py: the Frechet distance against closed forms, streaming statistics,
seed lists, detector loading, and generation/FID end to end on a tiny network with a stand-in detector."""
import json
import os
import pickle

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def fid(load):
    return load("08_evaluate_fid")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    # The 2048-d eigendecompositions slow down many-fold when their threads compete with other
    # processes for the CPU cores (measured: 32 s vs 240 s for this file on a loaded 2-core box).
    yield


def random_orthogonal(d, seed):
    q, r = np.linalg.qr(np.random.RandomState(seed).randn(d, d))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------
# Frechet distance.

def test_frechet_1d_gaussians(fid):
    # d^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (1.5, 0.3, -0.5, 2.0), (3.0, 1e-3, 3.0, 5.0)]:
        got = fid.frechet_distance([m1], [[s1 ** 2]], [m2], [[s2 ** 2]])
        assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-14)


def test_frechet_commuting_covariances(fid):
    # Shared eigenbasis U: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(l_i) - sqrt(m_i))^2
    d, rng = 40, np.random.RandomState(1)
    u = random_orthogonal(d, 2)
    lam, mu_eig = rng.uniform(0.01, 4, d), rng.uniform(0.01, 4, d)
    m1, m2 = rng.randn(d), rng.randn(d)
    got = fid.frechet_distance(m1, u @ np.diag(lam) @ u.T, m2, u @ np.diag(mu_eig) @ u.T)
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(lam) - np.sqrt(mu_eig)) ** 2)
    assert got == pytest.approx(want, rel=1e-11)


def test_frechet_non_commuting_2x2(fid):
    # For a 2x2 matrix M with non-negative eigenvalues, tr(M^(1/2)) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    s2 = np.array([[0.3, -0.2], [-0.2, 1.7]])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    want = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance([0, 0], s1, [0, 0], s2) == pytest.approx(want, rel=1e-12)


def test_frechet_zero_for_identical_and_symmetric_rank_deficient(fid):
    # Statistics of 200 samples in 512-d: covariances of rank 199.
    rng = np.random.RandomState(3)
    x = rng.randn(200, 512) * rng.uniform(0.1, 3, 512)
    y = rng.randn(200, 512) + 0.1
    a = (x.mean(0), np.cov(x, rowvar=False))
    b = (y.mean(0), np.cov(y, rowvar=False))
    assert abs(fid.frechet_distance(*a, *a)) < 1e-12 * np.trace(a[1])
    ab, ba = fid.frechet_distance(*a, *b), fid.frechet_distance(*b, *a)
    assert ab > 0
    assert ab == pytest.approx(ba, rel=1e-12)


def reflect(s, v):
    """H S H for the Householder reflection H = I - 2 v v^T (|v| = 1), in O(d^2)."""
    sv = s @ v
    return s - 2 * np.outer(v, sv) - 2 * np.outer(sv, v) + 4 * (v @ sv) * np.outer(v, v)


@pytest.mark.slow
def test_frechet_rank_deficient_2048d_closed_form(fid):
    # Commuting covariances of ranks 300 and 200 in 2048 dimensions, in a dense orthogonal
    # basis (two Householder reflections), where 100 directions of one lie in the other's
    # null space: d^2 = sum_i (sqrt(l_i) - sqrt(m_i))^2.
    d, rng = 2048, np.random.RandomState(4)
    lam, mu_eig = np.zeros(d), np.zeros(d)
    lam[:300] = rng.uniform(0.1, 5, 300)
    mu_eig[100:300] = rng.uniform(0.1, 5, 200)
    s1, s2 = np.diag(lam), np.diag(mu_eig)
    for _ in range(2):
        v = rng.randn(d)
        v /= np.linalg.norm(v)
        s1, s2 = reflect(s1, v), reflect(s2, v)
    got = fid.frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    want = np.sum((np.sqrt(lam) - np.sqrt(mu_eig)) ** 2)
    assert got == pytest.approx(want, rel=1e-10)


# ----------------------------------------------------------------------------
# Streaming statistics.

def test_batched_and_merged_stats_equal_one_shot(fid):
    rng = np.random.RandomState(6)
    x = (rng.randn(257, 12) * rng.uniform(0.5, 3, 12) + rng.randn(12) * 10).astype(np.float32).astype(np.float64)
    ranks = [fid.FeatureStats(12), fid.FeatureStats(12)]
    for i, chunk in enumerate(np.split(x, [5, 69, 70, 200])):  # uneven batches, dealt to two "ranks"
        ranks[i % 2].update(torch.from_numpy(chunk).float())  # float32 features, as detectors give
    merged = fid.FeatureStats(12)
    for s in ranks:  # what all_reduce does: sum the accumulators
        merged.n += s.n
        merged.sum += s.sum
        merged.sum_outer += s.sum_outer
    mu, sigma = merged.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------
# Seeds, subsets, pooling.

def test_parse_seeds(fid):
    assert fid.parse_seeds("0-3") == [0, 1, 2, 3]
    assert fid.parse_seeds("0,5,7-9") == [0, 5, 7, 8, 9]
    assert len(fid.parse_seeds("0-49999")) == 50000
    for bad in ["5-3", "a", "1,,2", "-1"]:
        with pytest.raises(ValueError, match="bad seed list"):
            fid.parse_seeds(bad)


def test_random_subset(fid):
    assert list(fid.random_subset(5, 5, 0)) == [0, 1, 2, 3, 4]
    sub = fid.random_subset(100, 10, 7)
    assert len(set(sub)) == 10 and list(sub) == sorted(sub)
    assert list(sub) == list(fid.random_subset(100, 10, 7))
    assert list(sub) != list(fid.random_subset(100, 10, 8))


def test_tf_average_pool_ignores_padding(fid):
    # On a constant image every window's mean is the constant, also at the borders
    # (torchvision's default pool would give 4/9 in the corners).
    x = torch.full([1, 2, 5, 5], 3.0)
    assert torch.equal(fid._tf_pool(x), x)
    y = torch.arange(25.0).reshape(1, 1, 5, 5)
    assert fid._tf_pool(y)[0, 0, 0, 0] == (0 + 1 + 5 + 6) / 4
    assert fid._tf_pool(y, use_max=True)[0, 0, 0, 0] == 6


# ----------------------------------------------------------------------------
# Detector files.

class ScriptedFeatures(torch.nn.Module):
    """Stands in for NVIDIA's TorchScript detector: uint8 NCHW -> features, with return_features."""

    def forward(self, x, return_features: bool = False):
        f = x.float().mean(dim=[2, 3])
        return f if return_features else f.sum(1)


def test_torchscript_detector_file(fid, tmp_path):
    path = str(tmp_path / "det.pt")
    torch.jit.save(torch.jit.script(ScriptedFeatures()), path)
    det = fid.open_detector_file(path)
    images = torch.randint(0, 256, [2, 3, 8, 8], dtype=torch.uint8)
    torch.testing.assert_close(fid.features_of(det, images), images.float().mean(dim=[2, 3]))


def test_detector_pickle_never_runs_code(fid, tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    # A pickle with an embedded TorchScript archive next to code that would run on a plain pickle.load.
    buf = tmp_path / "jit.pt"
    torch.jit.save(torch.jit.script(ScriptedFeatures()), str(buf))
    with open(tmp_path / "det.pkl", "wb") as f:
        pickle.dump({"evil": Evil(), "state": {"script": buf.read_bytes()}}, f)
    det = fid.open_detector_file(str(tmp_path / "det.pkl"))
    assert not marker.exists()
    images = torch.randint(0, 256, [2, 3, 4, 4], dtype=torch.uint8)
    torch.testing.assert_close(fid.features_of(det, images), images.float().mean(dim=[2, 3]))

    with open(tmp_path / "nojit.pkl", "wb") as f:
        pickle.dump({"evil": Evil()}, f)
    with pytest.raises(ValueError, match="inception-2015-12-05.pt"):
        fid.open_detector_file(str(tmp_path / "nojit.pkl"))
    assert not marker.exists()


def test_torchvision_detector_from_state_dict(fid, tmp_path):
    # The pytorch-fid file is a plain state dict of this architecture; random weights stand in.
    torch.manual_seed(0)
    path = str(tmp_path / "pt_inception.pth")
    torch.save(fid.tf_inception_v3().state_dict(), path)
    det = fid.open_detector_file(path)
    assert isinstance(det, fid.TorchvisionDetector)
    feats = fid.features_of(det, torch.randint(0, 256, [2, 1, 32, 32], dtype=torch.uint8))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_missing_detector_and_bad_reference(fid, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        fid.open_detector_file(str(tmp_path / "nope.pt"))
    (tmp_path / "truncated.pt").write_bytes(b"\x80\x02 not a state dict")
    with pytest.raises(ValueError, match="cannot read detector"):
        fid.open_detector_file(str(tmp_path / "truncated.pt"))
    with pytest.raises(FileNotFoundError, match="reference statistics not found"):
        fid.load_ref(str(tmp_path / "nope.npz"), 2048)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="64-d"):
        fid.load_ref(str(tmp_path / "ref.npz"), 2048)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(4))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_ref(str(tmp_path / "bad.npz"), 4)


# ----------------------------------------------------------------------------
# Generation and FID end to end: a --preset tiny model from 07 and a stand-in detector.

class StandInDetector(torch.nn.Module):
    """Test-only feature network: a fixed random projection of 2x2-pooled pixels, in float64."""
    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.w = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 2).flatten(1)
        return torch.tanh(3 * (x - 0.5) @ self.w)


@pytest.fixture(scope="module")
def tiny_network(load, tmp_path_factory):
    """A real `07_train_cifar10.py --preset tiny` model (class-conditional 16x16 shapes), trained 1 kimg."""
    outdir = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # module fixtures start before the per-test one_thread fixture
    try:
        load("07_train_cifar10").main(["--preset", "tiny", "--duration", "0.001", "--outdir", str(outdir),
                                       "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    (snapshot,) = sorted(outdir.glob("network-snapshot-*.pt"))
    return str(snapshot)


def run(fid, *args):
    fid.main([str(a) for a in args] + ["--device", "cpu"])


def read_pngs(folder):
    import PIL.Image
    names = sorted(os.listdir(folder))
    return names, [np.array(PIL.Image.open(os.path.join(folder, n))) for n in names]


@pytest.fixture(scope="module")
def pngs(fid, tiny_network, tmp_path_factory):
    """Seeds 0-7 written with batch 8 and with batch 3 (stochastic sampler: churn noise from the seeds too)."""
    out = {}
    for batch in (8, 3):
        out[batch] = str(tmp_path_factory.mktemp(f"b{batch}"))
        run(fid, "generate", "--network", tiny_network, "--seeds", "0-7", "--batch", batch, "--steps", 4,
            "--S_churn", 10, "--outdir", out[batch])
    return out


def test_generate_images_depend_on_seed_only(pngs):
    names8, images8 = read_pngs(pngs[8])
    names3, images3 = read_pngs(pngs[3])
    assert names8 == names3 == [f"{s:06d}.png" for s in range(8)]
    for a, b in zip(images8, images3):
        assert a.shape == (16, 16, 3) and np.array_equal(a, b)
    assert len({a.tobytes() for a in images8}) == 8


def test_fid_path_matches_calc_on_generated_pngs(fid, tiny_network, pngs, tmp_path, monkeypatch, capsys):
    detector = StandInDetector()
    monkeypatch.setattr(fid, "load_detector", lambda spec, device: detector)
    ref_dir = tmp_path / "ref_images"
    run(fid, "generate", "--network", tiny_network, "--seeds", "100-111", "--steps", 4, "--outdir", ref_dir)
    run(fid, "ref", "--data", ref_dir, "--dest", tmp_path / "ref.npz", "--batch", 5)
    ref = fid.load_ref(str(tmp_path / "ref.npz"), detector.feature_dim)

    # The one-shot protocol: two seed sets of 8 images, statistics in memory only.
    run(fid, "fid", "--network", tiny_network, "--ref", tmp_path / "ref.npz", "--num", 8, "--repeats", 2,
        "--batch", 3, "--steps", 4, "--S_churn", 10, "--outdir", tmp_path / "result")
    result = json.loads((tmp_path / "result" / "fid.json").read_text())
    assert result["seeds"] == ["0-7", "8-15"] and result["nfe"] == 7
    assert result["fid_min"] == min(result["fid"])

    # Its statistics equal those of the PNGs `generate` wrote, read back from disk.
    net = fid.load_net(tiny_network, "cpu")
    mu_g, sigma_g = fid.generated_stats(net, list(range(8)), detector, 3, "cpu", num_steps=4, S_churn=10.0)
    mu_c, sigma_c = fid.image_stats(fid.training.ImageFolder(pngs[8]), np.arange(8), detector, 5, "cpu")
    np.testing.assert_allclose(mu_g, mu_c, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sigma_g, sigma_c, rtol=1e-10, atol=1e-15)
    assert result["fid"][0] == pytest.approx(fid.frechet_distance(mu_c, sigma_c, *ref), rel=1e-10)

    capsys.readouterr()
    run(fid, "calc", "--images", pngs[8], "--ref", tmp_path / "ref.npz", "--num", 8)
    printed = float(capsys.readouterr().out.split("FID")[-1])
    assert printed == pytest.approx(result["fid"][0], rel=1e-5)

    # More images than --num: the official seeded subset, and --seed picks which.
    run(fid, "calc", "--images", pngs[8], "--ref", tmp_path / "ref.npz", "-n", 5, "--seed", 1)
    printed = float(capsys.readouterr().out.split("FID")[-1])
    subset = fid.random_subset(8, 5, 1)
    assert list(subset) != list(fid.random_subset(8, 5, 0))
    mu_s, sigma_s = fid.image_stats(fid.training.ImageFolder(pngs[8]), subset, detector, 5, "cpu")
    assert printed == pytest.approx(fid.frechet_distance(mu_s, sigma_s, *ref), rel=1e-5)
    with pytest.raises(SystemExit, match="found 8 images"):
        run(fid, "calc", "--images", pngs[8], "--ref", tmp_path / "ref.npz", "--num", 9)


def test_sampler_options_select_the_sampler_and_its_nfe(fid, tiny_network):
    parser = fid.build_parser()
    args = parser.parse_args(["generate", "--network", "x", "--steps", "5", "--S_churn", "2"])
    sampler, options = fid.sampler_from_args(args)
    assert sampler is fid.sampling.edm_sampler and options == {"num_steps": 5, "S_churn": 2.0}
    assert fid.nfe(sampler, options) == 9
    args = parser.parse_args(["fid", "--network", "x", "--ref", "r", "--solver", "euler", "--disc", "vp"])
    sampler, options = fid.sampler_from_args(args)
    assert sampler is fid.schedules.ablation_sampler and options == {"solver": "euler", "discretization": "vp"}
    assert fid.nfe(sampler, options) == 18
    assert fid.nfe(fid.sampling.edm_sampler, {}) == 35                  # Table 2's 35 NFE
    for bad in (["--rho", "0"], ["--sigma_min", "2", "--sigma_max", "1"]):
        with pytest.raises(ValueError, match="--rho|--sigma_min"):
            fid.sampler_from_args(parser.parse_args(["generate", "--network", "x"] + bad))

    # generate_batch calls the chosen sampler with the seeds' noise: the ablation sampler with EDM
    # settings and Heun is Algorithm 2, and gives the same images as edm_sampler.
    net = fid.load_net(tiny_network, "cpu")
    a = fid.generate_batch(net, [3, 4], "cpu", None, fid.sampling.edm_sampler, num_steps=3)
    b = fid.generate_batch(net, [3, 4], "cpu", None, fid.schedules.ablation_sampler, num_steps=3, solver="heun")
    assert a.dtype == torch.uint8 and torch.equal(a, b)


def test_bad_network_and_class_raise(fid, tiny_network, tmp_path):
    (tmp_path / "corrupt.pkl").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(ValueError, match="corrupt.pkl: truncated or corrupt"):
        fid.load_net(str(tmp_path / "corrupt.pkl"), "cpu")
    with open(tmp_path / "unsafe.pkl", "wb") as f:                 # names a global a checkpoint never needs
        pickle.dump({"ema": os.system}, f)
    with pytest.raises(ValueError, match="unsafe.pkl"):
        fid.load_net(str(tmp_path / "unsafe.pkl"), "cpu")
    with pytest.raises(FileNotFoundError, match="network file not found"):
        fid.load_net(str(tmp_path / "nope.pkl"), "cpu")
    net = fid.load_net(tiny_network, "cpu")
    fid.check_class(net, net.label_dim - 1)
    with pytest.raises(ValueError, match=f"--class {net.label_dim} but the network has {net.label_dim} classes"):
        fid.check_class(net, net.label_dim)
    with pytest.raises(SystemExit, match="--class 7"):
        run(fid, "generate", "--network", tiny_network, "--class", 7, "--seeds", "0", "--outdir", tmp_path)


def test_generate_writes_pngs_to_the_images_folder_by_default(fid, tiny_network, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(fid, "generate", "--network", tiny_network, "--seeds", "5,9", "--steps", 2, "--batch", 1)
    assert sorted(os.listdir(tmp_path / "out" / "08_evaluate_fid" / "images")) == ["000005.png", "000009.png"]
    assert os.listdir(tmp_path / "out" / "08_evaluate_fid") == ["images"]          # figures live one level up
    out = capsys.readouterr().out
    # Not a terminal: one plain line per batch group, no progress-bar redraws.
    assert "generate: batch 1/2" in out and "generate: batch 2/2" in out and "\r" not in out
    assert "calc --images" in out                                                  # says what to do next
