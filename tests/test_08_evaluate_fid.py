"""Tests for 08_evaluate_fid.py: the Frechet distance against closed forms, streaming statistics,
seed lists, detector loading, and generation/FID end to end on a tiny network with a stand-in detector."""
import json
import os
import pickle
import types

import numpy as np
import pytest
import torch


# The 2048-d eigendecompositions slow down many-fold when their threads compete with other
# processes for the CPU cores (measured: 32 s vs 240 s for this file on a loaded 2-core box).
pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_all_reduce_merges_every_accumulator_of_two_ranks(fid, monkeypatch):
    # FeatureStats.all_reduce with torch.distributed faked: rank 1's all_reduce calls record what it contributes;
    # rank 0's calls, in the same order (collectives line up), add it. The merged statistics must be those of
    # all images -- the image count summed too, or the mean of 2 ranks' images comes out twice too large.
    rng = np.random.RandomState(7)
    x = rng.randn(11, 3) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.25]
    ranks = [fid.FeatureStats(3), fid.FeatureStats(3)]
    ranks[0].update(torch.from_numpy(x[:6]))
    ranks[1].update(torch.from_numpy(x[6:]))
    contributed = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: contributed.append(t.clone()))
    ranks[1].all_reduce()
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(contributed.pop(0)))
    ranks[0].all_reduce()
    assert not contributed                        # as many collective calls on either rank
    mu, sigma = ranks[0].mean_cov()
    assert ranks[0].n.item() == 11
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)
    one = fid.FeatureStats(3)
    one.update(torch.from_numpy(x[:1]))
    with pytest.raises(ValueError, match="need at least 2 images for a covariance, got 1"):
        one.mean_cov()


def test_add_reads_generates_settings_and_refuses_a_settings_file_it_did_not_write(fid, tmp_path):
    """--add keeps generation.json's list of earlier settings (an empty one if there is none); a file of that
    name that is not such a list (damaged, or another tool's) is one error, not overwritten."""
    (tmp_path / "000000.png").write_bytes(b"")
    assert fid.check_outdir(str(tmp_path), [1], False, True) == []
    (tmp_path / "generation.json").write_text('[{"seeds": "0"}]')
    assert fid.check_outdir(str(tmp_path), [1], False, True) == [{"seeds": "0"}]
    for text in ('{"seeds": "0"}', '[{"seeds": '):
        (tmp_path / "generation.json").write_text(text)
        with pytest.raises(FileExistsError, match="generation.json is not generate's list of settings"):
            fid.check_outdir(str(tmp_path), [1], False, True)


# ----------------------------------------------------------------------------
# Ranks: each rank of a torchrun launch generates its share of the seeds. Here the ranks run one after the
# other in this process (common.get_rank/get_world_size faked); tests/test_07_scale.py runs two real processes.

# (seeds, batch): uneven last batches, fewer batches than ranks, a single seed, seeds that do not start at 0.
RANK_CASES = [(list(range(7)), 2), (list(range(10)), 4), ([5], 3), (list(range(3, 16)), 5), ([0, 9, 4, 2], 1)]


def seed_image(net, seeds, *args, **kwargs):
    """A stand-in for generate_batch(net, seeds, ...): seed s's image is 1x2x2, every pixel = s (a mix-up shows in the PNG)."""
    return torch.tensor(seeds, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def as_ranks(monkeypatch, world):
    """Yield rank 0, 1, ..., world-1 in turn, with 08 seeing that rank of `world`."""
    import common
    monkeypatch.setattr(common, "get_world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(common, "get_rank", lambda rank=rank: rank)
        yield rank


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_seed_is_generated_by_exactly_one_rank(fid, monkeypatch, tmp_path, world):
    import PIL.Image
    monkeypatch.setattr(fid, "generate_batch", seed_image)
    for seeds, batch in RANK_CASES:
        written, batches = [], []
        for rank in as_ranks(monkeypatch, world):
            batches.append(len(fid.rank_batches(seeds, batch)))
            assert all(len(b) <= batch for b in fid.rank_batches(seeds, batch))
            out = tmp_path / f"{seeds[0]}-{len(seeds)}-{batch}-rank{rank}"
            fid.generate_pngs(None, seeds, str(out), batch, "cpu")
            names = sorted(os.listdir(out)) if out.exists() else []
            written += names
            for name in names:   # each PNG holds its own seed's image
                assert np.all(np.array(PIL.Image.open(out / name)) == int(name[:6])), (world, rank, name)
        assert sorted(written) == sorted(f"{s:06d}.png" for s in seeds), (world, seeds, batch)
        assert len(set(batches)) == 1, batches   # collective calls line up: every rank has as many batches


class SeedDetector:
    """Features = one-hot of the image's seed (read back from seed_image's pixels): summed over all ranks,
    feature s counts how often seed s was measured."""
    feature_dim = 32

    def __call__(self, images):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), self.feature_dim).float()


class MergedStats:
    """08's FeatureStats with all_reduce done by hand: every rank's accumulators are kept, then summed."""

    def __init__(self, feature_stats):
        self.real, self.ranks = feature_stats, []

    def __call__(self, dim, device="cpu"):
        stats = self.real(dim, device)
        stats.mean_cov = lambda: None      # one rank's share alone may have < 2 images
        self.ranks.append(stats)
        return stats

    def counts(self):
        return sum(s.sum for s in self.ranks), sum(s.n for s in self.ranks)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fid_statistics_count_every_seed_and_every_image_once(fid, monkeypatch, world):
    monkeypatch.setattr(fid, "generate_batch", seed_image)
    images = seed_image(None, list(range(32))).expand(-1, 3, -1, -1)   # image i shows i (a uint8 tensor)
    feature_stats = fid.FeatureStats
    for seeds, batch in RANK_CASES:
        generated, measured = MergedStats(feature_stats), MergedStats(feature_stats)
        for _ in as_ranks(monkeypatch, world):
            monkeypatch.setattr(fid, "FeatureStats", generated)
            fid.generated_stats(None, seeds, SeedDetector(), batch, "cpu")
            monkeypatch.setattr(fid, "FeatureStats", measured)        # ref/calc: images[indices] by rank
            fid.image_stats(images, np.array(seeds), SeedDetector(), batch, "cpu")
        for stats in (generated, measured):
            counted, n = stats.counts()
            assert counted.tolist() == [float(s in seeds) for s in range(32)] and n == len(seeds), (world, seeds)


# ----------------------------------------------------------------------------
# Seeds and subsets.

def test_seed_lists(fid, capsys):
    """--seeds (common.number_list with ranges, as the official code): ranges inclusive; a bad list is one error line."""
    seeds = lambda text: fid.build_parser().parse_args(["generate", "--network", "n.pt", "--seeds", text]).seeds
    assert seeds("0-3") == [0, 1, 2, 3]
    assert seeds("0,5,7-9") == [0, 5, 7, 8, 9]
    assert len(seeds("0-49999")) == 50000
    assert fid.seed_ranges(seeds("0,5,7-9")) == "0,5,7-9" and fid.seed_ranges(seeds("0-49999")) == "0-49999"
    for bad, complaint in [("5-3", "range '5-3' runs backwards"), ("a", "expected an integer"), ("-1", "must be >= 0"),
                           ("", "expected an integer, got ''"), ("1,,2", "expected an integer, got ''")]:
        with pytest.raises(SystemExit):
            seeds(bad)
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"argument --seeds: {complaint}" in err, err


def test_random_subset(fid):
    assert list(fid.random_subset(5, 5, 0)) == [0, 1, 2, 3, 4]
    sub = fid.random_subset(100, 10, 7)
    assert len(set(sub)) == 10 and list(sub) == sorted(sub)
    assert list(sub) == list(fid.random_subset(100, 10, 7))
    assert list(sub) != list(fid.random_subset(100, 10, 8))


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
    det = fid.load_detector(path, "cpu")
    images = torch.randint(0, 256, [2, 3, 8, 8], dtype=torch.uint8)
    torch.testing.assert_close(det(images), images.float().mean(dim=[2, 3]))
    grey = torch.randint(0, 256, [2, 1, 8, 8], dtype=torch.uint8)             # greyscale is fed as RGB
    torch.testing.assert_close(det(grey), grey.repeat(1, 3, 1, 1).float().mean(dim=[2, 3]))


def test_missing_detector_and_bad_reference(fid, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        fid.load_detector(str(tmp_path / "nope.pt"), "cpu")
    (tmp_path / "truncated.pt").write_bytes(b"\x80\x02 not a state dict")
    with pytest.raises(ValueError, match="cannot read detector"):
        fid.load_detector(str(tmp_path / "truncated.pt"), "cpu")
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


def run(fid, *args):
    fid.main([str(a) for a in args] + ["--device", "cpu"])


def read_pngs(folder):
    """The {seed:06d}.png images in folder (not generate's grid.png), sorted by name."""
    import PIL.Image
    names = sorted(n for n in os.listdir(folder) if n[:6].isdigit())
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
        "--batch", 3, "--steps", 4, "--S_churn", 10, "--outdir", tmp_path / "result", "--detector", "stand-in")
    result = json.loads((tmp_path / "result" / "fid.json").read_text())
    assert result["seeds"] == ["0-7", "8-15"] and result["nfe"] == 7
    assert result["fid_min"] == min(result["fid"])

    # Its statistics equal those of the PNGs `generate` wrote, read back from disk.
    net = fid.load_net(tiny_network, "cpu")
    mu_g, sigma_g = fid.generated_stats(net, list(range(8)), detector, 3, "cpu", None,
                                        fid.common.load("04_stochastic_sampler").make_sampler(4, S_churn=10.0))
    mu_c, sigma_c = fid.image_stats(fid.ImageFolder(pngs[8]), np.arange(8), detector, 5, "cpu")
    np.testing.assert_allclose(mu_g, mu_c, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sigma_g, sigma_c, rtol=1e-10, atol=1e-15)
    assert result["fid"][0] == pytest.approx(fid.frechet_distance(mu_c, sigma_c, *ref), rel=1e-10)

    capsys.readouterr()
    run(fid, "calc", "--images", pngs[8], "--ref", tmp_path / "ref.npz", "--num", 8, "--detector", "stand-in")
    printed = float(capsys.readouterr().out.split("FID")[-1])
    assert printed == pytest.approx(result["fid"][0], rel=1e-5)

    # More images than --num: the official seeded subset, and --seed picks which.
    run(fid, "calc", "--images", pngs[8], "--ref", tmp_path / "ref.npz", "-n", 5, "--seed", 1, "--detector", "stand-in")
    printed = float(capsys.readouterr().out.split("FID")[-1])
    subset = fid.random_subset(8, 5, 1)
    assert list(subset) != list(fid.random_subset(8, 5, 0))
    mu_s, sigma_s = fid.image_stats(fid.ImageFolder(pngs[8]), subset, detector, 5, "cpu")
    assert printed == pytest.approx(fid.frechet_distance(mu_s, sigma_s, *ref), rel=1e-5)
    with pytest.raises(SystemExit, match="found 8 images"):
        run(fid, "calc", "--images", pngs[8], "--ref", tmp_path / "ref.npz", "--num", 9)


def test_sampler_options_select_the_sampler_and_the_measured_nfe(fid, tiny_network):
    parser = fid.build_parser()
    sampler_of = lambda *argv: fid.sampler_from_args(parser.parse_args(["generate", "--network", "x", *argv]))
    net = fid.load_net(tiny_network, "cpu")

    def measured_nfe(sample):                            # network calls per image, counted on 2 images
        counter = fid.common.CountingDenoiser(net)
        fid.generate_batch(counter, [3, 4], "cpu", sample)
        return counter.per_image(2)

    # Each options -> (sampler function, solver, step kind, options it runs with) and its NFE: Heun 2n - 1
    # (Sec. 3), Euler and the multistep solvers n.
    cases = [
        ((), ("edm_sampler", "heun", "edm"), {"num_steps": 18}, 35),                             # Table 2's 35 NFE
        (("--steps", "5", "--S_churn", "2"), ("edm_sampler", "heun", "edm"), {"num_steps": 5, "S_churn": 2.0}, 9),
        (("--solver", "heun", "--nfe", "7"), ("edm_sampler", "heun", "edm"), {"num_steps": 4}, 7),
        (("--solver", "euler", "--disc", "vp", "--nfe", "6"), ("ablation_sampler", "euler", "vp"), {"num_steps": 6}, 6),
        (("--disc", "ve", "--steps", "3"), ("ablation_sampler", "heun", "ve"), {"num_steps": 3}, 5),
        (("--solver", "ipndm", "--nfe", "10"), ("sample_ipndm", "ipndm", "edm"), {"num_steps": 10, "rho": 7.0}, 10),
        (("--solver", "ipndm",), ("sample_ipndm", "ipndm", "edm"), {"num_steps": 18, "rho": 7.0}, 18),  # as 04's
        (("--solver", "dpmpp3m", "--steps", "6"), ("sample_dpmpp_3m", "dpmpp3m", "logsnr"), {"num_steps": 6}, 6),
        (("--solver", "dpmpp2m", "--nfe", "5", "--sigma-steps", "time_uniform"),
         ("sample_dpmpp_2m", "dpmpp2m", "time_uniform"), {"num_steps": 5, "rho": 1.0}, 5),
        (("--sigma-steps", "logsnr", "--nfe", "9"), ("sample_heun", "heun", "logsnr"), {"num_steps": 5}, 9),  # 09's Heun
        (("--solver", "euler", "--steps", "4", "--rho", "3"), ("sample_euler", "euler", "edm"),
         {"num_steps": 4, "rho": 3.0}, 4),
    ]
    for argv, (function, solver, kind), options, nfe in cases:
        sample = sampler_of(*argv)
        settings = sample.settings
        assert (settings["function"], settings["solver"], settings["sigma_steps"]) == (function, solver, kind), argv
        assert options.items() <= settings["options"].items(), (argv, settings)
        if argv:                                         # the default's 35 NFE: counted in the fid test
            assert measured_nfe(sample) == nfe, argv

    for bad, complaint in [(["--rho", "0"], "--rho"), (["--sigma-min", "2", "--sigma-max", "1"], "--sigma-min"),
                           (["--nfe", "10"], "odd"), (["--solver", "ipndm", "--nfe", "1"], "at least 2 NFE"),
                           (["--solver", "ipndm", "--S_churn", "1"], "deterministic"),
                           (["--solver", "dpmpp2m", "--rho", "2"], "logsnr"),
                           (["--solver", "dpmpp3m", "--disc", "vp"], "euler or heun"),
                           (["--sigma-steps", "edm", "--scaling", "vp"], "--disc")]:
        with pytest.raises(ValueError, match=complaint):
            sampler_of(*bad)

    # generate_batch calls the chosen sampler with the seeds' noise: the ablation sampler with EDM
    # settings and Heun is Algorithm 2, and gives the same images as edm_sampler.
    a = fid.generate_batch(net, [3, 4], "cpu", fid.common.load("04_stochastic_sampler").make_sampler(3))
    b = fid.generate_batch(net, [3, 4], "cpu", fid.common.load("03_heun_and_schedules").make_sampler(3, solver="heun"))
    assert a.dtype == torch.uint8 and torch.equal(a, b)


def test_class_conditions_every_seed_on_that_class(fid):
    seen = []
    def sampler(net, latents, extra_args, randn_like):     # records what generate_batch hands the sampler
        seen.append(extra_args["class_labels"])
        return torch.zeros_like(latents)
    net = types.SimpleNamespace(img_channels=3, img_resolution=4, label_dim=5)
    fid.generate_batch(net, [0, 1, 2, 3], "cpu", sampler, 3)
    assert torch.equal(seen[-1], torch.eye(5)[[3, 3, 3, 3]]), "--class 3 must give every seed class 3"
    fid.generate_batch(net, [0, 1, 2, 3], "cpu", sampler)   # no --class: each seed draws its own
    drawn = seen[-1].argmax(1)
    assert torch.equal(seen[-1], torch.eye(5)[drawn]) and len(set(drawn.tolist())) > 1


def test_solver_options_run_09s_solvers_on_their_steps(fid, load, tiny_network):
    # The samples of 09's solver itself on its step kind, fitted to the network's range, from latents * sigma_0:
    # what --solver/--nfe/--sigma-steps must run, with exactly the NFE asked for.
    fast = load("09_fast_samplers")
    net = fid.load_net(tiny_network, "cpu")
    latents = torch.randn([3, 3, 16, 16], generator=torch.Generator().manual_seed(1))
    extra = {"class_labels": torch.eye(4)[[0, 2, 3]]}
    parser = fid.build_parser()
    for solver, nfe, kind in [("ipndm", 10, "edm"), ("dpmpp3m", 6, "logsnr"), ("heun", 7, "edm"),
                              ("dpmpp2m", 5, "time_uniform")]:
        sample = fid.sampler_from_args(parser.parse_args(["generate", "--network", "x", "--solver", solver,
                                                          "--nfe", str(nfe), "--sigma-steps", kind]))
        sigmas = fast.sigma_steps(kind, fast.steps_for_nfe(solver, nfe), *fid.common.noise_range(net, 0.002, 80.0))
        want = fast.SOLVERS[solver].sample(net, latents.to(torch.float64) * sigmas[0], sigmas, extra)
        counter = fid.common.CountingDenoiser(net)
        assert torch.equal(sample(counter, latents, extra), want), solver
        assert counter.per_image(len(latents)) == nfe, solver


def test_bad_network_and_class_raise(fid, tiny_network, tmp_path):
    (tmp_path / "corrupt.pkl").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(ValueError, match="corrupt.pkl: truncated or corrupt"):
        fid.load_net(str(tmp_path / "corrupt.pkl"), "cpu")
    with open(tmp_path / "unsafe.pkl", "wb") as f:                 # names a global a checkpoint never needs
        pickle.dump({"ema": os.system}, f)
    with pytest.raises(ValueError, match="unsafe.pkl"):
        fid.load_net(str(tmp_path / "unsafe.pkl"), "cpu")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        fid.load_net(str(tmp_path / "nope.pkl"), "cpu")
    label_dim = fid.load_net(tiny_network, "cpu").label_dim
    run(fid, "generate", "--network", tiny_network, "--class", label_dim - 1, "--seeds", "0", "--steps", 2,
        "--outdir", tmp_path / "last")                                          # the last class is fine
    with pytest.raises(SystemExit, match=f"--class {label_dim} but the network has {label_dim} classes"):
        run(fid, "generate", "--network", tiny_network, "--class", label_dim, "--seeds", "0", "--outdir", tmp_path)
    assert os.listdir(tmp_path / "last") and not (tmp_path / "000000.png").exists()     # the bad one wrote nothing


def test_generate_writes_pngs_to_the_images_folder_by_default(fid, tiny_network, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(fid, "generate", "--network", tiny_network, "--seeds", "5,9", "--steps", 2, "--batch", 1)
    assert sorted(os.listdir(tmp_path / "out" / "08_evaluate_fid" / "images")) == \
        ["000005.png", "000009.png", "generation.json", "grid.png"]
    assert os.listdir(tmp_path / "out" / "08_evaluate_fid") == ["images"]          # figures live one level up
    out = capsys.readouterr().out
    # Not a terminal: one plain line per batch group, no progress-bar redraws.
    assert "generate: batch 1/2" in out and "generate: batch 2/2" in out and "\r" not in out
    assert "calc --images" in out                                                  # says what to do next


# ----------------------------------------------------------------------------
# Chapter 09's solvers and chapter 10's guidance from the command line, end to end.

@pytest.fixture(scope="module")
def other_networks(load, tiny_network, tmp_path_factory):
    """(guide, unconditional): the tiny network with every weight shrunk by 10% (a different network
    of the same task, for autoguidance) and an unconditional network of the same architecture."""
    unet = load("06_unet")
    data = torch.load(tiny_network, map_location="cpu", weights_only=True)
    folder = tmp_path_factory.mktemp("other_networks")
    guide = unet.from_official_config(data["class_name"], data["kwargs"])
    guide.load_state_dict(data["state_dict"])
    with torch.no_grad():
        for p in guide.parameters():
            p.mul_(0.9)
    torch.manual_seed(0)
    uncond = unet.from_official_config(data["class_name"], {**data["kwargs"], "label_dim": 0})
    paths = str(folder / "guide.pt"), str(folder / "uncond.pt")
    unet.save_network(guide, paths[0])
    unet.save_network(uncond, paths[1])
    return paths


def generated(fid, network, outdir, *options, batch=8, seeds="0-7"):
    """The images `generate` writes for the seeds, as [H, W, C] arrays in seed order."""
    run(fid, "generate", "--network", network, "--seeds", seeds, "--batch", batch, "--outdir", outdir, *options)
    return read_pngs(outdir)[1]


def same_images(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_fast_solver_generation_depends_on_seed_only(fid, tiny_network, tmp_path):
    images8 = generated(fid, tiny_network, tmp_path / "b8", "--solver", "ipndm", "--nfe", 10, batch=8)
    images3 = generated(fid, tiny_network, tmp_path / "b3", "--solver", "ipndm", "--nfe", 10, batch=3)
    assert len(images8) == 8 and images8[0].shape == (16, 16, 3)
    assert same_images(images8, images3)
    assert len({a.tobytes() for a in images8}) == 8


def test_default_generation_is_algorithm_2_with_18_steps(fid, tiny_network, tmp_path):
    # What the official generate.py does per seed: latents, then the class, then Algorithm 2's churn noise.
    common = fid.common
    seeds = [0, 1, 2]
    net = fid.load_net(tiny_network, "cpu")
    rnd = common.StackedRandomGenerator("cpu", seeds)
    latents = rnd.randn([3, 3, 16, 16])
    labels = torch.eye(4)[rnd.randint(4, size=[3])]
    sigmas = common.edm_sigma_steps(18, net=net)                         # Eq. 5 on the network's range, then 0
    want = common.to_uint8(fid.common.load("04_stochastic_sampler").edm_sampler(
        net, latents.to(torch.float64) * sigmas[0], sigmas, {"class_labels": labels}, randn_like=rnd.randn_like))
    default = generated(fid, tiny_network, tmp_path / "default", seeds="0-2")
    assert same_images(default, list(want.numpy()))
    assert same_images(generated(fid, tiny_network, tmp_path / "heun35", "--solver", "heun", "--nfe", 35,
                                 seeds="0-2"), default)


def test_sampling_networks_run_channels_last_on_the_cpu_with_the_same_outputs(fid, tiny_network):
    """What 08 samples with (load_net: 06's for_sampling of the loaded network): eval mode, no gradients and, on the CPU,
    every convolution weight in the channels_last layout (issue 29: faster there); D(x; sigma) then differs from
    the standard layout's by float rounding only."""
    net = fid.load_net(tiny_network, "cpu")
    plain = fid.common.load("06_unet").load_network(tiny_network).eval()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    weights = [p for p in net.parameters() if p.ndim == 4]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)                  # 3x3 kernels: truly another layout
    g = torch.Generator().manual_seed(0)
    x = torch.randn([4, 3, 16, 16], generator=g, dtype=torch.float64)
    labels = torch.eye(4)
    for sigma in (0.002, 1.0, 80.0):
        with torch.no_grad():
            want = fid.common.denoise(plain, x * sigma, torch.tensor(sigma), {"class_labels": labels})
            got = fid.common.denoise(net, x * sigma, torch.tensor(sigma), {"class_labels": labels})
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_guidance_is_seed_only_and_exactly_unguided_where_it_must_be(fid, tiny_network, other_networks, tmp_path):
    guide, _ = other_networks
    quick = ("--nfe", 7)
    unguided = generated(fid, tiny_network, tmp_path / "unguided", *quick)
    cfg8 = generated(fid, tiny_network, tmp_path / "cfg8", *quick, "--guidance", 2)
    cfg3 = generated(fid, tiny_network, tmp_path / "cfg3", *quick, "--guidance", 2, batch=3)
    assert same_images(cfg8, cfg3) and not same_images(cfg8, unguided)
    auto8 = generated(fid, tiny_network, tmp_path / "auto8", "--solver", "dpmpp2m", "--nfe", 6,
                      "--guidance", 2, "--guide-network", guide)
    auto3 = generated(fid, tiny_network, tmp_path / "auto3", "--solver", "dpmpp2m", "--nfe", 6,
                      "--guidance", 2, "--guide-network", guide, batch=3)
    assert same_images(auto8, auto3)
    assert not same_images(auto8, generated(fid, tiny_network, tmp_path / "dpm", "--solver", "dpmpp2m", "--nfe", 6))

    # w = 1 is D_main, also with the guidance machinery switched on (an interval, a guide network) ...
    for k, options in enumerate([("--guidance", 1), ("--guidance", 1, "--guidance-interval", "0,100"),
                                 ("--guidance", 1, "--guide-network", guide)]):
        assert same_images(generated(fid, tiny_network, tmp_path / f"w1_{k}", *quick, *options), unguided), options
    # ... and a guide equal to the main network gives D_main for every w.
    for w in (0, 3):
        assert same_images(generated(fid, tiny_network, tmp_path / f"self{w}", *quick, "--guidance", w,
                                     "--guide-network", tiny_network), unguided), w


def test_fid_records_solver_steps_measured_nfe_and_guidance(fid, tiny_network, other_networks, tmp_path,
                                                            monkeypatch):
    monkeypatch.setattr(fid, "load_detector", lambda spec, device: StandInDetector())
    np.savez(tmp_path / "ref.npz", mu=np.zeros(6), sigma=np.eye(6))
    guide, _ = other_networks

    def fid_json(*options):
        out = tmp_path / f"run{len(os.listdir(tmp_path))}"
        run(fid, "fid", "--network", tiny_network, "--ref", tmp_path / "ref.npz", "-n", 4, "--repeats", 2,
            "--batch", 3, "--outdir", out, "--detector", "stand-in", *options)
        return json.loads((out / "fid.json").read_text())

    # Eq. 5 with N = 5, rho = 7 (Heun, 9 NFE): which levels lie in a guidance interval [0.5, 5]?
    t = [(80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(5)]
    inside = sum(0.5 <= t_i <= 5 for t_i in t) + sum(0.5 <= t_i <= 5 for t_i in t[1:])   # Euler + Heun's 2nd call
    assert inside == 2
    no_guidance = {"w": 1.0, "method": "none", "guide_network": None, "interval": None}
    cases = [
        ((), ("heun", "edm", 35, 35), no_guidance),
        (("--solver", "ipndm", "--nfe", 10), ("ipndm", "edm", 10, 10), no_guidance),
        (("--solver", "dpmpp2m", "--nfe", 6, "--sigma-steps", "time_uniform"), ("dpmpp2m", "time_uniform", 6, 6),
         no_guidance),
        (("--solver", "euler", "--disc", "vp", "--nfe", 8), ("euler", "vp", 8, 8), no_guidance),
        # CFG evaluates the network twice per call inside the interval: measured, not assumed.
        (("--nfe", 9, "--guidance", 2, "--guidance-interval", "0.5,5"), ("heun", "edm", 9, 9 + inside),
         {"w": 2.0, "method": "cfg", "guide_network": None, "interval": [0.5, 5.0]}),
        (("--solver", "dpmpp3m", "--nfe", 5, "--guidance", 1.5, "--guide-network", guide),
         ("dpmpp3m", "logsnr", 5, 10),
         {"w": 1.5, "method": "autoguidance", "guide_network": os.path.abspath(guide), "interval": None}),
    ]
    for options, (solver, kind, nfe, evaluations), guidance in cases:
        result = fid_json(*options)
        assert (result["solver"], result["sigma_steps"], result["nfe"], result["network_evaluations"]) == \
            (solver, kind, nfe, evaluations), options
        assert result["guidance"] == guidance and result["seeds"] == ["0-3", "4-7"], options


@pytest.mark.parametrize("world", [2, 3])
def test_rank_0_reports_nfe_per_image_of_its_own_share_on_any_number_of_ranks(fid, tiny_network, tmp_path,
                                                                              monkeypatch, capsys, world):
    # Rank 0 of `world` (faked): it generates only its share of the 8 seeds, so the NFE it reports must divide
    # its own network calls by its own images (4 Heun steps: 7 NFE, Sec. 3), not by all 8 seeds.
    monkeypatch.setattr(fid, "load_detector", lambda spec, device: StandInDetector())
    np.savez(tmp_path / "ref.npz", mu=np.zeros(6), sigma=np.eye(6))
    next(as_ranks(monkeypatch, world))
    run(fid, "fid", "--network", tiny_network, "--ref", tmp_path / "ref.npz", "-n", 8, "--batch", 2, "--steps", 4,
        "--detector", tmp_path / "standin.pt", "--outdir", tmp_path / "fid")    # a local file: loaded first
    result = json.loads((tmp_path / "fid" / "fid.json").read_text())
    assert (result["nfe"], result["network_evaluations"], result["gpus"]) == (7, 7, world)
    capsys.readouterr()
    run(fid, "generate", "--network", tiny_network, "--seeds", "0-7", "--batch", 2, "--steps", 4,
        "--outdir", tmp_path / "png")
    assert "7 NFE per image (measured; 7 network evaluations)" in capsys.readouterr().out
    share = [seed for batch in fid.rank_batches(list(range(8)), 2) for seed in batch.tolist()]
    pngs = sorted(name for name in os.listdir(tmp_path / "png") if name != "grid.png" and name.endswith(".png"))
    assert 0 < len(share) < 8 and pngs == [f"{seed:06d}.png" for seed in share]


@pytest.mark.parametrize("options, complaint", [
    (["--nfe", "0"], "argument --nfe: must be >= 1, got 0"),
    (["--nfe", "10"], "the budget must be odd and >= 3, got 10"),
    (["--solver", "heun", "--nfe", "4"], "the budget must be odd"),
    (["--solver", "ipndm", "--nfe", "1"], "ipndm needs at least 2 NFE"),
    (["--steps", "4", "--nfe", "7"], "argument --nfe: not allowed with argument --steps"),
    (["--guidance", "nan"], "argument --guidance: must be >= 0, got nan"),
    (["--guidance", "2", "--guidance-interval", "3,1"], "0 <= LO <= HI"),
    (["--guidance", "2", "--guidance-interval", "0.3"], "two numbers LO,HI"),
    (["--guidance", "2", "--network", "UNCOND"], "class-conditional"),
    (["--guidance", "2", "--guide-network", "UNCOND"], "same task"),
    (["--solver", "dpmpp2m", "--S_churn", "5"], "deterministic"),
    (["--sigma-min", "1", "--sigma-max", "1"], "0 < --sigma-min < --sigma-max"),
    (["--disc", "vp", "--sigma-steps", "logsnr"], "the ablation sampler's are --disc"),
    (["--solver", "dpmpp2m", "--sigma-steps", "logsnr", "--rho", "5"], "logsnr steps are uniform in log sigma"),
])
def test_bad_solver_and_guidance_options_are_one_error_line(fid, tiny_network, other_networks, options, complaint,
                                                            tmp_path, capsys):
    options = [other_networks[1] if o == "UNCOND" else o for o in options]
    network = [] if "--network" in options else ["--network", tiny_network]
    for command in (["generate", "--seeds", "0-1", "--outdir", tmp_path / "images"],
                    ["fid", "--ref", tmp_path / "ref.npz", "-n", 2, "--outdir", tmp_path / "result"]):
        with pytest.raises(SystemExit) as exit:
            run(fid, *command, *network, *options)
        text = exit.value.code if isinstance(exit.value.code, str) else capsys.readouterr().err
        error_lines = [line for line in text.splitlines() if "error:" in line]
        assert len(error_lines) == 1 and complaint in error_lines[0], (command[0], text)
    assert os.listdir(tmp_path) == []
