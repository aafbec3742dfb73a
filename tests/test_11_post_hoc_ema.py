"""11's post-hoc EMA: the power-function profile against its closed forms, its update (07's update_ema with 11's
beta_t) against the profile, the least-squares reconstruction of a 07 run against the EMA that run tracked
directly, and the command line."""
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def P(load):
    return load("11_post_hoc_ema")


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def numerical(f, t, points=400001):
    """integral of f over [0, t], trapezoidal on a fine grid."""
    tau = np.linspace(0, t, points)
    return np.trapezoid(f(tau), tau)


# ----------------------------------------------------------------------------
# The profile, its width and its update.

@pytest.mark.parametrize("sigma_rel", [0.003, 0.01, 0.05, 0.07, 0.10, 0.2, 0.28, 1 / math.sqrt(12)])
def test_sigma_rel_gamma_round_trip_and_the_width_is_the_profiles_std(P, sigma_rel):
    gamma = P.phema_gamma(sigma_rel)
    assert gamma >= 0 and P.phema_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    t = 3.0                                                           # the width is relative: any t
    mean = numerical(lambda tau: tau * P.profile(tau, t, gamma), t)
    variance = numerical(lambda tau: (tau - mean) ** 2 * P.profile(tau, t, gamma), t)
    assert numerical(lambda tau: P.profile(tau, t, gamma), t) == pytest.approx(1, rel=1e-6)
    assert math.sqrt(variance) / t == pytest.approx(sigma_rel, rel=1e-4)


def test_sigma_rel_out_of_range_is_refused(P):
    for bad in (0, -0.1, 0.3, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            P.phema_gamma(bad)


@pytest.mark.parametrize("sigma_rel", [0.02, 0.1, 0.25])
def test_beta_t_reproduces_the_continuous_profile(T, P, sigma_rel):
    # theta_tau = the tau-th unit vector: after t updates the average holds the weight of every step.
    steps, gamma = 60, P.phema_gamma(sigma_rel)
    net, average = torch.nn.Linear(steps, 1, bias=False).double(), torch.nn.Linear(steps, 1, bias=False).double()
    for t in range(1, steps + 1):
        with torch.no_grad():
            net.weight.copy_(torch.nn.functional.one_hot(torch.tensor(t - 1), steps).double())
        T.update_ema(average, net, P.phema_beta(t, gamma))
        if t in (1, 17, steps):
            expected = P.profile_mass(t, gamma, np.arange(steps), np.arange(1, steps + 1))
            np.testing.assert_allclose(average.weight.detach().numpy()[0], expected, rtol=0, atol=1e-13)


def test_inner_products_are_the_integrals(P):
    for (t_a, g_a), (t_b, g_b) in [((1.0, 3.0), (1.0, 3.0)), ((0.6, 16.97), (1.0, 6.94)), ((2.0, 0.0), (1.3, 40.0))]:
        exact = numerical(lambda tau: P.profile(tau, t_a, g_a) * P.profile(tau, t_b, g_b), min(t_a, t_b))
        assert P.inner_product(t_a, g_a, t_b, g_b) == pytest.approx(exact, rel=1e-6)
        assert P.inner_product(t_b, g_b, t_a, g_a) == P.inner_product(t_a, g_a, t_b, g_b)
    # Long runs: times in images (~1e8) with narrow profiles overflow m^gamma written naively.
    assert P.inner_product(2e8, 97.0, 2.1e8, 97.0) == pytest.approx(P.inner_product(2.0, 97.0, 2.1, 97.0) / 1e8)


STORED = [(t, gamma) for t in (1.0, 2.0, 3.0, 4.0) for gamma in (16.97, 6.94)]


def test_coefficients_are_one_hot_when_the_target_is_a_stored_profile(P):
    for k in range(len(STORED)):
        c, error = P.solve_coefficients(STORED, STORED[k])
        np.testing.assert_allclose(c, np.eye(len(STORED))[k], atol=1e-7)
        assert error < 1e-6


def test_profile_error_is_the_l2_distance_and_sum_of_coefficients_is_one(P):
    target = (3.5, 11.24)                                   # sigma_rel 0.07 between two snapshot times
    c, error = P.solve_coefficients(STORED, target)
    assert c.sum() == pytest.approx(1, abs=1e-12)
    q = lambda tau: sum(ci * P.profile(tau, *s) for ci, s in zip(c, STORED)) - P.profile(tau, *target)
    norm = lambda f: math.sqrt(numerical(lambda tau: f(tau) ** 2, 4.0))
    assert error == pytest.approx(norm(q) / norm(lambda tau: P.profile(tau, *target)), rel=1e-4)
    assert error > 0.01                                     # not representable exactly: a real test
    # Least squares: nudging the coefficients (keeping their sum) only makes the profile worse.
    for k in range(len(STORED) - 1):
        nudge = np.zeros(len(STORED))
        nudge[k], nudge[k + 1] = 1e-3, -1e-3
        assert P.profile_error(STORED, c + nudge, target) > error


# ----------------------------------------------------------------------------
# A 07 run with --phema 0.05,0.07,0.1: 32 steps of 16 images, snapshots every 8 steps.

SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
         "--lr-rampup", "0.0002", "--device", "cpu"]
BATCH, STEPS, SNAP_STEPS = 16, 32, 8


@pytest.fixture(scope="module")
def run(T, tmp_path_factory):
    """The run folder and the raw weights after every step (float64 [steps, parameters])."""
    out = tmp_path_factory.mktemp("phema") / "run"
    trajectory = []
    record = lambda optimizer, *_: trajectory.append(
        torch.cat([p.detach().flatten().double() for p in optimizer.param_groups[0]["params"]]))
    hook = register_optimizer_step_post_hook(record)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(T, "save_preview", lambda *args: None)     # previews cost most of the run's time
            T.main(SMALL + ["--duration", str(BATCH * STEPS / 1e6), "--snap", str(BATCH * SNAP_STEPS / 1e3),
                            "--tick", "1", "--phema", "0.05,0.07,0.1", "--outdir", str(out)])
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    return out, torch.stack(trajectory)


def flat(net):
    return torch.cat([p.detach().flatten().double() for p in net.parameters()])


def check_reconstruction(P, load, run_dir, trajectory, out):
    """Compare the network 11 wrote to `out` with the 0.07 EMA that training tracked. Returns (error, bound,
    residual): |theta_rec - theta_tracked|; its bound from the profile error, ||q - p|| ||theta - theta_bar||
    (+ rounding); and the residual of the exact identity theta_rec - theta_tracked = sum_tau E_tau theta_tau,
    where E_tau is the mass of q - p on step tau (q, p: the profiles of the reconstruction and the target)."""
    ch06 = load("06_unet")
    rec = flat(ch06.load_network(str(out)))
    tracked = flat(ch06.load_network(P.phema_path(str(run_dir), 0.07, BATCH * STEPS)))
    # The snapshot schedule the test knows, independent of the files on disk: 0.05 and 0.1 every SNAP_STEPS.
    stored = [(BATCH * k, P.phema_gamma(s)) for k in range(SNAP_STEPS, STEPS + 1, SNAP_STEPS) for s in (0.05, 0.1)]
    target = (BATCH * STEPS, P.phema_gamma(0.07))
    c, relative = P.solve_coefficients(stored, target)
    edges = BATCH * np.arange(STEPS + 1)
    E = sum(ci * P.profile_mass(*s, edges[:-1], edges[1:]) for ci, s in zip(c, stored)) \
        - P.profile_mass(*target, edges[:-1], edges[1:])
    predicted = torch.as_tensor(E) @ trajectory
    # float32 rounding: each average rounds once per step (relative eps/2 per entry, independent from step to
    # step: a random walk, sqrt(STEPS)); the reconstruction sums sum |c_i| of them plus the tracked one.
    rounding = torch.finfo(torch.float32).eps * math.sqrt(STEPS) * (1 + np.abs(c).sum()) * \
        float(trajectory.norm(dim=1).max())
    spread = math.sqrt(BATCH * float((trajectory - trajectory.mean(0)).square().sum()))   # steps BATCH images long
    bound = relative * math.sqrt(P.inner_product(*target, *target)) * spread + rounding
    error = float((rec - tracked).norm())
    residual = float((rec - tracked - predicted).norm())
    return error, bound, residual, rounding


def reconstruct(P, run_dir, out):
    P.main(["--run", str(run_dir), "--sigma-rel", "0.07", "--from", "0.05,0.1", "--out", str(out)])


def test_reconstruction_of_a_tracked_width_matches_it_within_the_profile_error_bound(P, load, run, tmp_path, capsys):
    run_dir, trajectory = run
    assert len(trajectory) == STEPS
    reconstruct(P, run_dir, tmp_path / "ema.pt")
    printed = capsys.readouterr().out
    assert "from 8 snapshots" in printed and "relative profile error" in printed
    error, bound, residual, rounding = check_reconstruction(P, load, run_dir, trajectory, tmp_path / "ema.pt")
    assert error <= bound, (error, bound)
    assert residual <= rounding, (residual, rounding)          # the error IS the profile error applied to theta
    assert error > 10 * rounding                                 # (not trivially: 8 snapshots do not fit 0.07 exactly)

    # The check notices snapshots in the wrong order, or one left out.
    for mutate in ("shuffle", "drop"):
        broken = tmp_path / mutate
        shutil.copytree(run_dir, broken)
        a, b = (broken / os.path.basename(P.phema_path("", 0.05, BATCH * k)) for k in (SNAP_STEPS, STEPS))
        if mutate == "shuffle":
            a.rename(broken / "tmp.pt")
            b.rename(a)
            (broken / "tmp.pt").rename(b)
        else:
            b.unlink()
        reconstruct(P, broken, tmp_path / f"{mutate}.pt")
        error, bound, residual, rounding = check_reconstruction(P, load, broken, trajectory,
                                                                tmp_path / f"{mutate}.pt")
        assert error > bound or residual > rounding, (mutate, error, bound, residual)


def test_the_tracked_widths_are_their_snapshots_and_reconstruction_from_themselves_is_exact(P, load, run, tmp_path):
    run_dir, _ = run
    ch06 = load("06_unet")
    for kimg in (BATCH * SNAP_STEPS / 1e3, BATCH * STEPS / 1e3):      # also at an earlier stopping point
        P.main(["--run", str(run_dir), "--sigma-rel", "0.07", "--at-kimg", str(kimg), "--out", str(tmp_path / "a.pt")])
        tracked = ch06.load_network(P.phema_path(str(run_dir), 0.07, round(kimg * 1000)))
        torch.testing.assert_close(flat(ch06.load_network(str(tmp_path / "a.pt"))), flat(tracked), rtol=0, atol=1e-6)


def test_the_written_snapshot_generates_images_with_08(P, load, run, tmp_path):
    run_dir, _ = run
    reconstruct(P, run_dir, tmp_path / "ema.pt")
    load("08_evaluate_fid").main(["generate", "--network", str(tmp_path / "ema.pt"), "--seeds", "0-1", "--steps", "3",
                                  "--outdir", str(tmp_path / "images"), "--device", "cpu"])
    assert sorted(os.listdir(tmp_path / "images")) == ["000000.png", "000001.png", "generation.json", "grid.png"]


def test_bad_command_lines_give_one_error_line(run, tmp_path, assert_one_line_errors):
    run_dir, _ = run
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "x.pt")]
    texts = assert_one_line_errors("11_post_hoc_ema.py", [
        ["--run", str(tmp_path / "nowhere"), *out],
        ["--run", str(tmp_path / "empty"), *out],
        ["--run", str(run_dir), "--at-kimg", "5", *out],
        ["--run", str(run_dir), "--from", "0.05,0.2", *out],
        ["--run", str(run_dir)],
        ["--run", str(run_dir), "--sigma-rel", "0.5", *out],
    ], tmp_path, prefix=[])
    for text, fragment in zip(texts, ["no such folder", "--phema", "at most the last snapshot", "stores only",
                                      "--out", "--sigma-rel"]):
        assert fragment in text, text
    assert not os.path.exists(tmp_path / "x.pt")


def test_demo_keeps_07s_report_in_its_log_and_its_claims_match_its_tables(T, P, run, tmp_path, capsys, monkeypatch,
                                                                          one_thread):
    """The demo at reduced size, case (c)'s 07 run stood in for by the fixture's run: 07's own report goes to
    tiny-run/log.txt, not into 11's output (one 'What this shows'); and 'differ by at most G in W1' holds for
    the W1 values as the tables print them (rows with profile error under 5%)."""
    run_dir, _ = run

    def train_07(argv):
        print("07's report")
        shutil.copytree(run_dir, argv[argv.index("--outdir") + 1], dirs_exist_ok=True)
    monkeypatch.setattr(T, "main", train_07)
    P.main(["--toy-steps", "100", "--snapshot-every", "10", "--samples", "100", "--sampler-steps", "4",
            "--outdir", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "07's report" not in out and "07's report" in (tmp_path / "tiny-run" / "log.txt").read_text()
    assert out.count("What this shows") == 1 and (tmp_path / "post_hoc_ema.png").stat().st_size > 0
    rows = re.findall(r"^ +[\d.]+ +([\d.]+) +([\d.]+) +([\d.e+-]+) +[\d.e+-]+$", out.split("(b)")[0], re.M)
    good = [abs(float(a) - float(b)) for a, b, error in rows if float(error) < 0.05]
    assert len(rows) == 18 and good, rows
    (gap,) = re.findall(r"differ by at most ([\d.]+) in W1", " ".join(out.split()))
    assert float(gap) == pytest.approx(max(good), abs=1e-9)


def test_files_that_are_not_one_runs_snapshots_are_refused_or_passed_over(P, tmp_path):
    """combine sums one run's snapshots only (a damaged file or another network: one sentence naming it, before
    anything is written); find_snapshots takes 07's phema-<sigma_rel>-<kimg>.pt names only; an empty selection
    has no coefficients."""
    def save(name, **state):
        torch.save({"format": "f", "state_dict": state}, tmp_path / name)
        return str(tmp_path / name)
    a, b = save("a.pt", w=torch.tensor([1.0, 2.0], dtype=torch.float32)), save("b.pt", w=torch.tensor([3.0, 6.0]))
    mixed = P.combine([a, b], [0.75, 0.25])
    assert mixed["format"] == "f" and torch.equal(mixed["state_dict"]["w"], torch.tensor([1.5, 3.0]))
    halves = [save(f"h{i}.pt", w=torch.tensor([1.0 + i], dtype=torch.float16), v=torch.tensor([1 / 3 + i], dtype=torch.float64))
              for i in range(2)]                                      # each tensor comes back in its file's dtype
    mixed = P.combine(halves, [0.5, 0.5])["state_dict"]
    assert (mixed["w"].dtype, mixed["v"].dtype) == (torch.float16, torch.float64)
    assert mixed["w"].item() == 1.5 and mixed["v"].item() == 1 / 3 + 0.5
    other = save("other.pt", w=torch.zeros(3))
    (tmp_path / "cut.pt").write_bytes(open(b, "rb").read()[:50])
    with pytest.raises(ValueError, match=r"other\.pt holds another network than .*a\.pt: snapshots of one run only"):
        P.combine([a, other], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"cannot read .*cut\.pt as a network snapshot"):
        P.combine([a, str(tmp_path / "cut.pt")], [0.5, 0.5])
    with pytest.raises(ValueError, match="no snapshots to reconstruct from"):
        P.solve_coefficients([], (1000, P.phema_gamma(0.1)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("phema-0.050-0.512.pt", "phema-notes.pt", "phema-0.050-final.pt", "phema-0.100-1.024.pt.tmp"):
        (run_dir / name).write_bytes(b"")
    assert [(os.path.basename(s.path), s.sigma_rel, s.nimg) for s in P.find_snapshots(str(run_dir))] == \
        [("phema-0.050-0.512.pt", 0.05, 512)]
