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
    if name == "FM":         # x_t = x / (1 + sigma) = (1 - t) y + t n, D = x_t - t F, t = sigma / (1 + sigma)
        return 1 / (1 + s), -s / (1 + s), 1 / (1 + s), 1000 * s / (1 + s)


def make(ch05, name, value, **kwargs):
    out = 6 if name == "iDDPM" else 3
    cls = {"VP": ch05.VPPrecond, "VE": ch05.VEPrecond, "iDDPM": ch05.iDDPMPrecond, "EDM": ch05.EDMPrecond,
           "FM": ch05.FMPrecond}[name]
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

@pytest.mark.parametrize("name", ["VP", "VE", "iDDPM", "EDM", "FM"])
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
    for name in ["VP", "VE", "EDM", "FM"]:
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
    if name == "FM":
        return ((1 + s) / s) ** 2
    return (s ** 2 + sd ** 2) / (s * sd) ** 2 if name == "EDM" else 1 / s ** 2


def ks_distance(samples, cdf):
    s = np.sort(samples)
    n = len(s)
    F = cdf(s)
    return max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n))


@pytest.mark.parametrize("name", ["VP", "VE", "iDDPM", "EDM", "FM"])
def test_loss_is_weighted_denoising_error_with_table1_sigmas(ch05, name):
    torch.manual_seed(0)
    loss_fn = {"VP": ch05.VPLoss(), "VE": ch05.VELoss(), "iDDPM": ch05.iDDPMLoss(), "EDM": ch05.EDMLoss(),
               "FM": ch05.FMLoss()}[name]
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
    erf = np.vectorize(math.erf)
    if name == "EDM":        # ln sigma ~ N(-1.2, 1.2^2)
        assert ks_distance(np.log(s), lambda v: 0.5 * (1 + erf((v + 1.2) / (1.2 * math.sqrt(2))))) < 2 / math.sqrt(N)
    elif name == "FM":       # logit t ~ N(0, 1) (SD3), t = sigma / (1 + sigma)
        t = s / (1 + s)
        assert ks_distance(np.log(t / (1 - t)), lambda v: 0.5 * (1 + erf(v / math.sqrt(2)))) < 2 / math.sqrt(N)
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
    for name in ["VP", "VE", "iDDPM", "EDM", "FM", "EDM+u"]:
        assert f"  {name} " in out
    assert "What this shows" in out and all(f in out for f in ["scalings.png", "loss_per_sigma.png", "samples.png"])


def test_demo_claims_hold_at_reduced_size(ch05, load, one_thread):
    """What this shows, with 400 training steps and one seed (the demo: 2000 steps, two seeds): EDM's denoiser is
    the closest to D* of the paper's four, EDM's and FM's above sigma = 5 by far although VP trains there more; FM
    is closer than EDM above 5 and further below 0.05, where their p_train put their samples; VP's samples owe more
    to its errors at sigma <= 5 than to its large errors above."""
    ch01 = load("01_toy_1d")
    mix = ch01.default_mixture()
    r, info = ch05.experiment(ch01, mix, 0.95, [0], train_steps=400, batch=256, samples=2000, num_steps=32,
                              log=lambda _: None)
    high, low = info["sigmas"] > ch05.SPLIT, info["sigmas"] < 0.05
    error = {name: np.mean(r["error"][name], axis=0) for name in ch05.NAMES}
    assert min(["VP", "VE", "iDDPM", "EDM"], key=lambda n: error[n].mean()) == "EDM"     # the paper's four
    assert any(ch05.lowest_elsewhere(error, info["sigmas"]).values())    # closest on average, not at every sigma
    for bounded in ("EDM", "FM"):                                        # |c_out| < 1: far closer above sigma = 5
        assert all(error[bounded][high].mean() < error[n][high].mean() / 3 for n in ["VP", "VE", "iDDPM"])
    # FM against EDM: closer above 5 and further below 0.05, as SD3's p_train against EDM's.
    assert error["FM"][high].mean() < error["EDM"][high].mean() and error["FM"][low].mean() > error["EDM"][low].mean()
    draws = {n: ch05.training_sigmas(loss_fn, 20000) for n, (_, loss_fn) in ch05.make_setups(ch01, 0.95, 0).items()}
    shares = {n: float((s > ch05.SPLIT).double().mean()) for n, s in draws.items()}
    assert shares["VP"] > 0.3 > shares["FM"] > 0.03 > shares["EDM"]
    assert float((draws["FM"] < 0.05).double().mean()) < 0.01 < 0.05 < float((draws["EDM"] < 0.05).double().mean())
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


# ----------------------------------------------------------------------------
# Flow matching as a row of Table 1 (issue 31): every identity to float64 precision, derived independently here.
# Rectified flow: x_t = (1 - t) y + t n, the network predicts the velocity v = dx_t/dt = n - y; EDM's noisy image is
# x = x_t / (1 - t) = y + sigma n with sigma = t / (1 - t).

def fm_velocity(mix, x_t, t):
    """E[n - y | x_t] for the toy's mixture, computed in flow matching's own coordinates: given component k
    (y ~ N(mu_k, s_k^2)), x_t ~ N((1 - t) mu_k, v_k), v_k = (1 - t)^2 s_k^2 + t^2, and (y, n) are jointly Gaussian
    with x_t: E[y | x_t, k] = mu_k + (1 - t) s_k^2 / v_k (x_t - (1 - t) mu_k), E[n | x_t, k] = t / v_k (...)."""
    mu, sd, w = mix.means, mix.stds, mix.weights
    v = (1 - t) ** 2 * sd ** 2 + t ** 2
    r = x_t[:, None] - (1 - t) * mu
    log_post = torch.log(w) - 0.5 * torch.log(2 * math.pi * v) - r ** 2 / (2 * v)
    post = torch.softmax(log_post, dim=1)
    return (post * (t / v * r - (mu + (1 - t) * sd ** 2 / v * r))).sum(1)


def test_hand_computed_fm_velocity_through_the_fm_preconditioning_is_the_exact_denoiser(ch05, load):
    """D = c_skip x + c_out F(c_in x; c_noise) with F = the exact velocity: 01's closed-form D*, float64."""
    mix = load("01_toy_1d").default_mixture()
    net = make(ch05, "FM", 0)
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)
    for sigma in (0.01, 0.2, 1.0, 3.0, 40.0):
        s = torch.tensor(sigma, dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = net.scalings(s)
        D = c_skip * x + c_out * fm_velocity(mix, c_in * x, c_noise / 1000)
        torch.testing.assert_close(D, mix.denoise(x, s), rtol=1e-12, atol=1e-13)
    # The same through forward (float32, as every network): F sees x_t = c_in x and c_noise = 1000 t.
    net.model.forward = lambda x_in, noise_labels, class_labels=None, **kw: \
        fm_velocity(mix, x_in.double().flatten(), noise_labels.double() / 1000).reshape(x_in.shape).float()
    torch.testing.assert_close(net(x.reshape(-1, 1), 1.0).double().flatten(), mix.denoise(x, torch.tensor(1.0)),
                               rtol=1e-5, atol=1e-5)


def test_fm_loss_is_the_velocity_loss_on_the_same_samples(ch05):
    """lambda |D - y|^2 with lambda = ((1 + sigma) / sigma)^2 equals |F - (n - y)|^2 for any F, float64."""
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.randn(1000, generator=g, dtype=torch.float64) * 2)     # 1e-4 ... 1e3
    t = sigma / (1 + sigma)
    F = lambda x_t, t: torch.sin(3 * x_t) * t - x_t ** 2           # any network  # noqa: E731
    x_t = (1 - t) * y + t * n
    velocity_loss = (F(x_t, t) - (n - y)) ** 2
    c_skip, c_out, c_in, c_noise = make(ch05, "FM", 0).scalings(sigma)
    x = y + sigma * n
    D = c_skip * x + c_out * F(c_in * x, c_noise / 1000)
    torch.testing.assert_close(ch05.FMLoss().weight(sigma) * (D - y) ** 2, velocity_loss, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(ch05.FMLoss().weight(sigma), 1 / c_out ** 2, rtol=1e-14, atol=0)   # lambda c_out^2 = 1
    torch.testing.assert_close((x_t - D) / t, F(x_t, t), rtol=1e-10, atol=1e-12)  # velocity = (x_t - D) / t


def test_logit_normal_t_is_log_normal_sigma(ch05):
    """SD3's t = sigmoid(m + s z) gives sigma = t / (1 - t) = e^(m + s z) sample by sample, and its density
    1 / (s sqrt(2 pi) t (1 - t)) e^(-(logit t - m)^2 / (2 s^2)) times dt/dsigma = 1 / (1 + sigma)^2 is the
    log-normal density of sigma: EDM's p_train with P_mean = m, P_std = s."""
    z = torch.linspace(-5, 5, 2001, dtype=torch.float64)
    for m, s in ((0.0, 1.0), (-1.2, 1.2), (0.5, 0.6)):
        t = torch.sigmoid(m + s * z)
        torch.testing.assert_close(t / (1 - t), torch.exp(m + s * z), rtol=5e-14, atol=0)
        sigma = t / (1 - t)
        logit_normal = torch.exp(-(torch.logit(t) - m) ** 2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))
        log_normal = torch.exp(-(sigma.log() - m) ** 2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * sigma)
        torch.testing.assert_close(logit_normal / (1 + sigma) ** 2, log_normal, rtol=1e-12, atol=0)
    assert (ch05.FMLoss().P_mean, ch05.FMLoss().P_std) == (0.0, 1.0)                    # SD3's rf/lognorm(0.00, 1.00)


# ----------------------------------------------------------------------------
# EDM2's learned weighting: lambda / e^u |D - y|^2 + u, u = u(sigma) inside the network.

def test_uncertainty_is_edm2s_fourier_features_and_a_unit_linear_layer(ch05):
    torch.manual_seed(0)
    net = ch05.EDMPrecond(Probe(1.0, 3), 8, 3, logvar_channels=16)
    assert sorted(net.state_dict()) == ["model.weight", "uncertainty.freqs", "uncertainty.phases", "uncertainty.weight"]
    sigma = torch.tensor([0.01, 0.5, 3.0, 70.0])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        D, u = net(x, sigma, return_logvar=True)
    assert torch.equal(D, net(x, sigma)) and u.shape == (4, 1, 1, 1)
    f, phi, w = [net.uncertainty.state_dict()[k].double() for k in ("freqs", "phases", "weight")]
    for i, s in enumerate(sigma.double()):
        expected = (w / w.norm() * math.sqrt(2) * torch.cos(f * s.log() / 4 + phi)).sum()
        assert float(u[i]) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    assert ch05.EDMPrecond(Probe(1.0, 3), 8, 3).uncertainty is None          # no learned weighting: no u


def test_learned_weighting_optimum_is_the_weighted_error(ch05):
    """For fixed D, the mean of lambda e^-u |D - y|^2 + u over samples at one sigma is smallest at
    u* = ln mean(lambda |D - y|^2), and exceeds its minimum by exactly e^-delta + delta - 1 at u* + delta."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4096, 1, generator=g, dtype=torch.float64)
    sigma = torch.full([1, 1], 0.7, dtype=torch.float64)
    loss_fn = ch05.EDMLoss(learned=True)
    u = torch.zeros([], dtype=torch.float64, requires_grad=True)

    def net(x, sigma, labels=None, augment_labels=None, return_logvar=False):
        assert return_logvar
        return 0.5 * x, u * torch.ones_like(sigma)                    # a poor denoiser, and the u under test
    torch.manual_seed(1)
    q = (loss_fn.weight(sigma) * (0.5 * (y + torch.randn_like(y) * sigma) - y) ** 2).mean()
    u_star = float(q.log())

    def mean_loss(value):
        with torch.no_grad():
            u.fill_(value)
        torch.manual_seed(1)                                          # the same noise every time
        return ch05.denoising_loss(net, y, None, None, sigma, loss_fn.weight(sigma), learned=True).mean()
    loss = mean_loss(u_star)
    grad, = torch.autograd.grad(loss, u)
    assert abs(float(grad)) < 1e-12
    for delta in (-0.5, 0.1, 1.0):
        excess = float((mean_loss(u_star + delta) - loss).detach())
        assert excess == pytest.approx(math.exp(-delta) + delta - 1, rel=1e-10)


def test_learned_weighting_reaches_its_optimum_on_the_toy_within_the_derived_bound(ch05, load, one_thread):
    """EDM+u trained on the toy (reduced budget): e^u(sigma) = lambda E|D - y|^2 measured, within weighting_check's
    bound at every sigma inside p_train's central 95 %; the bound is tighter than ln 2 there, so a weighting that
    misses its optimum by a factor 2 (e.g. `+ 2 u` in the loss) fails."""
    ch01 = load("01_toy_1d")
    mix = ch01.default_mixture()
    net, loss_fn = ch05.make_setups(ch01, 0.95, 0)["EDM+u"]
    ch01.train_toy(net, mix, loss_fn, 600, 512, 2e-3, 0)
    sigmas = np.logspace(np.log10(0.002), np.log10(80), 25)
    w = ch05.weighting_check(net, loss_fn, mix, sigmas, 4096, 512, torch.Generator().manual_seed(2))
    inside = w["inside"]
    assert inside.sum() >= 10 and w["bound"][inside].max() < math.log(2)
    gap = np.abs(w["u"] - w["log_L"])
    assert np.all(gap[inside] <= w["bound"][inside]), (gap[inside], w["bound"][inside])
