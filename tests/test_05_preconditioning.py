"""Tests for 05_preconditioning.py against Table 1 written out independently here (float64 math)."""
import math
import os

import numpy as np
import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


@pytest.fixture(scope="module")
def ch05(load):
    return load("05_preconditioning")


class Probe(torch.nn.Module):
    """A raw network that outputs a constant and records what the preconditioner passed it.

    With 2x channels (iDDPM) the second half is filled with 1e3, which D must ignore."""

    def __init__(self, value, out_channels):
        super().__init__()
        self.value, self.out_channels = value, out_channels
        self.weight = torch.nn.Parameter(torch.zeros([]))  # gives the state dict a "model.weight" key

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.seen = dict(x=x, noise_labels=noise_labels, class_labels=class_labels, kwargs=kwargs)
        shape = [x.shape[0], self.out_channels, *x.shape[2:]]
        out = torch.full(shape, float(self.value), dtype=x.dtype)
        out[:, x.shape[1]:] = 1e3
        return out


# Table 1, typed in from the paper: sigma -> (c_skip, c_out, c_in, c_noise) in float64.
def vp_t_of_sigma(s, beta_d=19.9, beta_min=0.1):
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(1 + s ** 2)) - beta_min) / beta_d


def table1(name, s, sd=0.5, u=None):
    if name == "VP":
        return 1.0, -s, 1 / math.sqrt(s ** 2 + 1), 999 * vp_t_of_sigma(s)
    if name == "VE":
        return 1.0, s, 1.0, math.log(s / 2)
    if name == "iDDPM":
        j = int(np.argmin(np.abs(u - s)))
        return 1.0, -s, 1 / math.sqrt(s ** 2 + 1), 999 - j
    if name == "EDM":
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / math.sqrt(s ** 2 + sd ** 2), 1 / math.sqrt(s ** 2 + sd ** 2), math.log(s) / 4


def make(ch05, name, value, **kwargs):
    out = 6 if name == "iDDPM" else 3
    cls = {"VP": ch05.VPPrecond, "VE": ch05.VEPrecond, "iDDPM": ch05.iDDPMPrecond, "EDM": ch05.EDMPrecond}[name]
    return cls(Probe(value, out), 8, 3, **kwargs)


def u_table_float64(M=1000, C_1=0.001, C_2=0.008):
    alpha_bar = lambda j: math.sin(math.pi / 2 * j / (M * (C_2 + 1))) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return np.array(u)


# ----------------------------------------------------------------------------
# Table 1 schedules.

def test_vp_sigma_and_inverse_are_table1(ch05):
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    sigma = ch05.vp_sigma(t, 19.9, 0.1)
    expected = np.sqrt(np.exp(0.5 * 19.9 * t.numpy() ** 2 + 0.1 * t.numpy()) - 1)
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(ch05.vp_sigma_inv(sigma, 19.9, 0.1).numpy(), t.numpy(), rtol=1e-9)
    net = make(ch05, "VP", 0)
    # The official code evaluates sigma(epsilon_t) in float32, where exp(~1e-6) - 1 is only resolved to
    # float32's spacing near 1 (2^-23): sigma_min = 0.000977 rather than 0.001000. We keep that value.
    assert abs(net.sigma_min ** 2 - math.expm1(0.5 * 19.9e-10 + 0.1e-5)) <= 2 ** -23
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-6)


def test_iddpm_u_table(ch05):
    net = make(ch05, "iDDPM", 0)
    u = net.u.double().numpy()
    assert u.shape == (1001,) and u[-1] == 0
    assert np.all(np.diff(u) < 0)
    # The table is built in float32 like the official one; the recursed quantity 1 + u_j^2 stays within
    # float32 rounding accumulated over the 1000 steps (small u_j themselves lose digits to 1 + u^2 - 1).
    np.testing.assert_allclose(1 + u ** 2, 1 + u_table_float64() ** 2, rtol=1e-5)
    assert net.sigma_min == float(net.u[999]) and net.sigma_max == float(net.u[0])
    sigma = torch.cat([torch.logspace(-3, 2, 200, dtype=torch.float64), net.u[:-1].double()])
    rounded = net.round_sigma(sigma)
    assert rounded.dtype == sigma.dtype and rounded.shape == sigma.shape
    assert torch.equal(net.round_sigma(rounded), rounded)                        # idempotent
    assert torch.isin(rounded.float(), net.u).all()                              # lands on the table
    nearest = np.abs(sigma.numpy()[:, None] - u[None, :]).min(1)
    np.testing.assert_allclose(np.abs(sigma.numpy() - rounded.numpy()), nearest, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Preconditioners.

@pytest.mark.parametrize("name", ["VP", "VE", "iDDPM", "EDM"])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_network_gives_table1_denoiser(ch05, name, value):
    """F = 0 gives D = c_skip x; F = 1 gives c_skip x + c_out; F sees c_in x and c_noise (Table 1)."""
    net = make(ch05, name, value)
    u = net.u.double().numpy() if name == "iDDPM" else None
    sigma = torch.tensor([0.003, 0.05, 0.7, 4.0, 60.0], dtype=torch.float64)
    sigma = net.round_sigma(sigma) if name == "iDDPM" else sigma
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    D = net(x, sigma)
    assert D.dtype == torch.float32 and D.shape == x.shape
    seen = net.model.seen
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in, c_noise = table1(name, s, u=u)
        np.testing.assert_allclose(D[i].double().numpy(), (c_skip * x[i] + value * c_out).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen["x"][i].double().numpy(), (c_in * x[i]).numpy(), rtol=1e-5, atol=1e-7)
        # VP's t(sigma) takes ln(1 + sigma^2) in float32 (as official): 1 + sigma^2 is resolved to 2^-24,
        # and dt/d ln(1 + sigma^2) <= 1/beta_min, so c_noise = 999 t is good to 999 * 2^-24 / 0.1 absolute.
        tol = 999 * 2 ** -24 / 0.1 if name == "VP" else 1e-5
        assert float(seen["noise_labels"][i]) == pytest.approx(c_noise, rel=1e-5, abs=tol)
    assert seen["noise_labels"].shape == (5,) and seen["class_labels"] is None


def test_scalar_sigma_toy_shape_labels_and_kwargs(ch05):
    net = make(ch05, "EDM", 1.0, label_dim=4, sigma_data=0.9)
    net.model.out_channels = 1
    x = torch.randn(6, 1)                                     # 1-D points, as in the toy
    D = net(x, 2.0, augment_labels="aug")
    c_skip, c_out, _, c_noise = table1("EDM", 2.0, sd=0.9)
    np.testing.assert_allclose(D.numpy(), c_skip * x.numpy() + c_out, rtol=1e-6)
    seen = net.model.seen
    # One sigma for the batch stays one noise label (the raw network broadcasts it), as in the official code.
    assert seen["noise_labels"].shape == (1,) and torch.allclose(seen["noise_labels"], torch.tensor(c_noise).float())
    assert torch.equal(seen["class_labels"], torch.zeros(1, 4)) and seen["kwargs"] == {"augment_labels": "aug"}
    labels = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    net(x, torch.tensor(2.0), class_labels=labels.double())
    assert net.model.seen["class_labels"].dtype == torch.float32
    assert torch.equal(net.model.seen["class_labels"], labels)


def test_state_dict_keys_match_official_layout(ch05):
    for name in ["VP", "VE", "EDM"]:
        assert list(make(ch05, name, 0).state_dict()) == ["model.weight"]
    assert sorted(make(ch05, "iDDPM", 0).state_dict()) == ["model.weight", "u"]


def test_edm_unit_variance_input_and_target(ch05):
    """For data of std sigma_data, c_in (y + n) and the effective target of Eq. 8 have unit variance."""
    g = torch.Generator().manual_seed(0)
    sigma_data = 0.5
    y = sigma_data * math.sqrt(3) * (2 * torch.rand(400_000, 1, generator=g, dtype=torch.float64) - 1)  # uniform, std 0.5
    net = make(ch05, "EDM", 0)
    for sigma in [0.002, 0.2, 1.0, 5.0, 80.0]:
        x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
        c_skip, c_out, c_in, _ = [c.double() for c in net.scalings(torch.full([1, 1], sigma))]
        assert float((c_in * x).var()) == pytest.approx(1, abs=0.01)
        assert float(((y - c_skip * x) / c_out).var()) == pytest.approx(1, abs=0.01)
        weight = ch05.EDMLoss(sigma_data=sigma_data).weight(torch.tensor(sigma, dtype=torch.float64))
        assert float(weight * c_out ** 2) == pytest.approx(1, rel=1e-6)   # lambda c_out^2 = 1


# ----------------------------------------------------------------------------
# Losses.

class Recorder:
    """Wraps a denoiser; remembers every sigma, noisy input and output the loss asked for."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        D = self.net(x, sigma)
        self.calls.append(dict(x=x, sigma=sigma, D=D, augment_labels=augment_labels))
        return D


def lam(name, s, sd=0.5):
    return (s ** 2 + sd ** 2) / (s * sd) ** 2 if name == "EDM" else 1 / s ** 2


def ks_distance(samples, cdf):
    s = np.sort(samples)
    n = len(s)
    F = cdf(s)
    return max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n))


@pytest.mark.parametrize("name", ["VP", "VE", "iDDPM", "EDM"])
def test_loss_is_weighted_denoising_error_with_table1_sigmas(ch05, name):
    torch.manual_seed(0)
    loss_fn = {"VP": ch05.VPLoss(), "VE": ch05.VELoss(), "iDDPM": ch05.iDDPMLoss(), "EDM": ch05.EDMLoss()}[name]
    rec = Recorder(make(ch05, "EDM", 1.0))
    y = torch.randn(20000, 3, 2, 2)
    loss = loss_fn(rec, y)
    call = rec.calls[0]
    sigma = call["sigma"]
    assert sigma.shape == (20000, 1, 1, 1) and loss.shape == y.shape
    expected = lam(name, sigma.double()) * (call["D"].double() - y.double()) ** 2
    np.testing.assert_allclose(loss.double().numpy(), expected.numpy(), rtol=1e-5)
    z = ((call["x"] - y) / sigma).flatten().double()                  # the noise n / sigma ~ N(0, 1)
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(1, abs=0.01)

    s = sigma.flatten().double().numpy()
    N = len(s)
    if name == "EDM":        # ln sigma ~ N(-1.2, 1.2^2)
        erf = np.vectorize(math.erf)
        assert ks_distance(np.log(s), lambda v: 0.5 * (1 + erf((v + 1.2) / (1.2 * math.sqrt(2))))) < 2 / math.sqrt(N)
    elif name == "VE":       # ln sigma ~ U(ln 0.02, ln 100)
        a, b = math.log(0.02), math.log(100)
        assert ks_distance(np.log(s), lambda v: (v - a) / (b - a)) < 2 / math.sqrt(N)
    elif name == "VP":       # sigma = sigma(t), t ~ U(1e-5, 1)
        t = np.array([vp_t_of_sigma(v) for v in s])
        assert ks_distance(t, lambda v: (v - 1e-5) / (1 - 1e-5)) < 2 / math.sqrt(N)
    else:                    # sigma = u_j, j ~ U{0, ..., 999}
        u = common.iddpm_noise_levels(1000, 0.001, 0.008, torch.float32).double().numpy()   # as 05's buffer, above
        j = np.abs(s[:, None] - u[None, :]).argmin(1)
        assert np.array_equal(s, u[j])
        assert j.max() <= 999 and np.abs(np.bincount(j // 100, minlength=10) / N - 0.1).max() < 0.015


def test_loss_with_augment_pipe_denoises_the_augmented_images(ch05):
    rec = Recorder(make(ch05, "VE", 0.0))
    y = torch.randn(4, 3, 2, 2)
    aug_labels = torch.randn(4, 9)
    loss = ch05.EDMLoss()(rec, y, augment_pipe=lambda images: (-images, aug_labels))
    call = rec.calls[0]
    assert call["augment_labels"] is aug_labels
    np.testing.assert_allclose(loss.numpy(), (lam("EDM", call["sigma"]) * (call["D"] + y) ** 2).numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------
# The demo.

def test_demo_smoke(ch05, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:                                       # main sets one thread on CPU; give the rest of the suite its threads back
        ch05.main(["--device", "cpu", "--outdir", str(tmp_path), "--train-steps", "20", "--seeds", "1",
                   "--samples", "300", "--num-steps", "4"])
    finally:
        torch.set_num_threads(threads)
    assert {f.name for f in tmp_path.iterdir()} == {"scalings.png", "loss_per_sigma.png", "samples.png"}
    out = capsys.readouterr().out
    for name in ["VP", "VE", "iDDPM", "EDM"]:
        assert f"  {name} " in out
    assert "What this shows" in out and all(f in out for f in ["scalings.png", "loss_per_sigma.png", "samples.png"])


def test_demo_claims_hold_at_reduced_size(ch05, load, one_thread):
    """What this shows, with 400 training steps and one seed (the demo: 2000 steps, two seeds): EDM's denoiser is
    the closest to D*, above sigma = 5 by far although VP trains there more; VP's samples owe more to its errors
    at sigma <= 5 than to its large errors above."""
    ch01 = load("01_toy_1d")
    mix = ch01.default_mixture()
    r, info = ch05.experiment(ch01, mix, 0.95, [0], train_steps=400, batch=256, samples=2000, num_steps=32,
                              log=lambda _: None)
    high = info["sigmas"] > ch05.SPLIT
    error = {name: np.mean(r["error"][name], axis=0) for name in ch05.NAMES}
    assert min(ch05.NAMES, key=lambda n: error[n].mean()) == "EDM"
    assert any(ch05.lowest_elsewhere(error, info["sigmas"]).values())    # closest on average, not at every sigma
    assert all(error["EDM"][high].mean() < error[n][high].mean() / 3 for n in ch05.NAMES if n != "EDM")
    shares = {n: float((ch05.training_sigmas(loss_fn, 20000) > ch05.SPLIT).double().mean())
              for n, (_, loss_fn) in ch05.make_setups(ch01, 0.95, 0).items()}
    assert shares["VP"] > 0.3 > 0.05 > shares["EDM"]
    assert r["W1 high"]["VP"][0] < r["W1 low"]["VP"][0]


def test_lowest_elsewhere_names_the_sigmas_where_another_model_is_closer(ch05):
    sigmas = np.array([0.01, 0.1, 1.0, 10.0])
    error = {"VP": np.array([3, 1, 2, 9.0]), "VE": np.array([1, 2, 3, 9.0]), "iDDPM": np.array([4, 4, 4, 9.0]),
             "EDM": np.array([2, 2, 1, 1.0])}
    assert ch05.lowest_elsewhere(error, sigmas) == {"VP": [0.1], "VE": [0.01], "iDDPM": []}


# ----------------------------------------------------------------------------
# The VP sigma(t): a deliberate twin of 02's (05 copies with common.py alone); the iDDPM table: common.py's.

def test_vp_sigma_twins_agree_with_chapter_02(ch05, load):
    sigma, _, sigma_inv = load("02_ode_sampler").vp_schedule(19.9, 0.1)
    t = torch.logspace(-5, 0, 10001, dtype=torch.float64)
    # exp(g) here, e ** g there (each as its official counterpart writes it): a few ulps of e^g, which the
    # cancellation in e^g - 1 at small t amplifies to at most ~4e-12 relative.
    torch.testing.assert_close(ch05.vp_sigma(t, 19.9, 0.1), sigma(t), rtol=1e-11, atol=0)
    for dtype in (torch.float32, torch.float64):
        s = torch.logspace(-3, 2.5, 10001, dtype=dtype)
        assert torch.equal(ch05.vp_sigma_inv(s, 19.9, 0.1), sigma_inv(s))       # the same arithmetic


def test_iddpm_table_in_both_precisions_and_the_official_buffer(ch05):
    mine = make(ch05, "iDDPM", 0).u                                           # float32 u, as the official network
    home = common.iddpm_noise_levels(1000, 0.001, 0.008)                    # float64 u, as the official sampler (03)
    assert mine.dtype == torch.float32 and home.dtype == torch.float64
    # Same recursion; float32 rounding accumulated over 1000 steps in 1 + u^2 (small u lose digits to 1 + u^2 - 1).
    np.testing.assert_allclose(1 + mine.double().numpy() ** 2, 1 + home.numpy() ** 2, rtol=1e-5)
    # The official network code's float32 buffer, as stored in an official iDDPMPrecond state dict.
    official = torch.from_numpy(np.load(os.path.join(DATA, "ddpmpp_iddpm_cond_aug.npz"))["state/u"])
    np.testing.assert_allclose(mine.numpy(), official.numpy(), rtol=2e-6, atol=0)


# ----------------------------------------------------------------------------
# The command line.

def bad_inputs():
    cases = [["--train-steps", "0"], ["--batch", "1"], ["--lr", "fast"], ["--num-step", "8"], ["--frobnicate"]]
    return cases + ([] if torch.cuda.is_available() else [["--device", "cuda"]])


def test_command_line_errors_are_one_line(tmp_path, assert_one_line_errors):
    """Each bad input: a non-zero exit, exactly one "error:" line, no traceback, nothing written."""
    assert_one_line_errors("05_preconditioning.py", bad_inputs(), tmp_path, outdir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
