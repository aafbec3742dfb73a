"""08's command line: each subcommand has exactly its own options, typos are errors, bad inputs end
in one `error:` line (no traceback, nothing already written lost), and the demo's conclusion holds."""
import os
import re
import sys

import numpy as np
import PIL.Image
import pytest
import torch


SAMPLER = {"--steps", "--sigma-min", "--sigma-max", "--rho", "--S-churn", "--S-min", "--S-max", "--S-noise",
           "--solver", "--disc", "--schedule", "--scaling", "--nfe", "--sigma-steps",
           "--guidance", "--guide-network", "--guidance-interval",
           "--sigma_min", "--sigma_max", "--S_churn", "--S_min", "--S_max", "--S_noise"}   # old spellings: aliases
NETWORK = {"--network", "--class", "--batch"}
OPTIONS = {
    "demo": {"--seed", "--outdir", "--device"},
    "generate": {"--seeds", "--subdirs", "--outdir", "--add", "--device"} | NETWORK | SAMPLER,
    "ref": {"--data", "--data-dir", "--resolution", "--dest", "--detector", "--batch", "--device"},
    "calc": {"--images", "--ref", "-n", "--num", "--seed", "--detector", "--batch", "--device"},
    "fid": {"--ref", "-n", "--num", "--repeats", "--outdir", "--detector", "--device"} | NETWORK | SAMPLER,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def subparsers(parser):
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def test_each_subcommand_has_exactly_its_options(fid):
    parser = fid.build_parser()
    assert not parser.allow_abbrev
    commands = subparsers(parser)
    assert set(commands) == set(OPTIONS)
    for name, p in commands.items():
        flags = {s for a in p._actions for s in a.option_strings} - {"-h", "--help"}
        assert flags == OPTIONS[name], name
        assert not p.allow_abbrev, f"{name}: abbreviations must be errors, not other flags"
        assert [a.dest for a in p._actions if not a.option_strings] == [], f"{name} has positionals"
        # The usage line holds the command, options and their metavars only (no stray 'seed' etc.).
        words = re.findall(r"[\w-]+", p.format_usage().split(name, 1)[1])
        choices = {"euler", "heun", "dpmpp2m", "dpmpp3m", "ipndm", "vp", "ve", "iddpm", "edm", "linear", "none",
                   "logsnr", "time_uniform"}
        assert all(w.startswith("-") or w.isupper() or w in choices for w in words), (name, words)


def test_no_subcommand_means_the_demo(fid):
    assert fid.parse_args([]).run is fid.demo
    args = fid.parse_args(["--seed", "3", "--outdir", "X"])
    assert args.run is fid.demo and args.seed == 3 and args.outdir == "X"


@pytest.mark.parametrize("argv, complaint", [
    (["generate", "--network", "n.pkl", "--seed", "3"], "unrecognized arguments: --seed 3"),   # not --seeds 3
    (["demo", "5"], "unrecognized arguments: 5"),
    (["calc", "--images", "x", "--ref", "r", "--nu", "8"], "unrecognized arguments: --nu"),
    (["fid", "--network", "n", "--ref", "r", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["demo", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
])
def test_typos_and_out_of_range_numbers_are_one_line_errors(fid, argv, complaint, capsys):
    with pytest.raises(SystemExit) as exit:
        fid.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err and err.count("error:") == 1


def test_demo_with_seed_and_outdir_shows_its_claims(fid, tmp_path, capsys):
    fid.main(["demo", "--seed", "3", "--outdir", str(tmp_path / "X"), "--device", "cpu"])
    assert os.listdir(tmp_path / "X") == ["fid_vs_n.png"]
    with PIL.Image.open(tmp_path / "X" / "fid_vs_n.png") as image:
        assert image.size[0] >= 600
    out = capsys.readouterr().out
    true_fid = float(re.search(r"Closed-form FID\(generator, real\) = ([\d.]+)", out).group(1))
    rows = [list(map(float, line.split())) for line in out.splitlines() if re.fullmatch(r"\s*\d+(\s+[\d.]+){6}", line)]
    n, same, n_bias, gen = (np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                            np.array([r[2] for r in rows]), np.array([r[3:6] for r in rows]))
    assert list(n) == [500, 1000, 2000, 5000, 10000, 20000, 50000]
    # The claims the "What this shows" block makes: bias > 0 shrinking like 1/n, every estimate
    # above the true FID, and the three seed sets closer together at 50k than at 500.
    assert (same > 0).all() and (np.diff(same) < 0).all()
    assert n_bias.max() / n_bias.min() < 1.5
    assert (gen > true_fid).all()
    assert np.ptp(gen[-1]) < np.ptp(gen[0]) / 10
    conclusion = out[out.index("What this shows"):]
    assert "fid_vs_n.png" in conclusion and "generate" in conclusion and "fid --network" in conclusion


def test_progress_plain_lines_off_a_terminal_and_tqdm_on_one(fid, capsys, monkeypatch):
    assert list(fid.progress(list(range(25)), "features")) == list(range(25))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("  features: batch 25/25") and "\r" not in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert list(fid.progress(list(range(25)), "features")) == list(range(25))
    captured = capsys.readouterr()
    assert captured.out == "" and "25/25" in captured.err


# ----------------------------------------------------------------------------
# Bad inputs, each in its own process as a user would meet them. (Corrupt detector files, bad seed
# lists and an out-of-range --class are checked in-process in test_08_evaluate_fid.py.)

class ScriptedFeatures(torch.nn.Module):
    def forward(self, x, return_features: bool = False):
        return x.float().mean(dim=[2, 3])


def png(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.new("RGB", size, (10, 20, 30)).save(path)


def snapshot(folder):
    """{relative path: bytes} of everything under folder."""
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(folder) for f in files}


def test_bad_inputs_end_in_one_error_line_and_keep_earlier_output(tmp_path, assert_one_line_errors):
    t = tmp_path
    png(str(t / "mixed" / "a.png"), (8, 8))
    png(str(t / "mixed" / "b.png"), (16, 16))
    (t / "empty").mkdir()
    (t / "corrupt-net.pt").write_bytes(b"PK\x03\x04" + bytes(range(200)))           # a truncated zip
    torch.jit.save(torch.jit.script(ScriptedFeatures()), str(t / "det.pt"))
    np.savez(t / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    # Earlier results that a failing run must not touch.
    png(str(t / "run" / "images" / "000000.png"), (8, 8))
    (t / "run" / "fid.json").write_text('{"fid_min": 2.5}')
    np.savez(t / "run" / "cifar-ref.npz", mu=np.ones(3), sigma=np.eye(3))
    before = snapshot(t / "run")

    cases = {
        "missing path": (["calc", "--images", t / "nowhere", "--ref", t / "ref.npz"], "nowhere"),
        "empty folder": (["calc", "--images", t / "empty", "--ref", t / "ref.npz", "-n", 2], "no images"),
        "mixed sizes": (["ref", "--data", t / "mixed", "--dest", t / "run" / "cifar-ref.npz", "--detector",
                         t / "det.pt", "--device", "cpu"], "'b.png' is 16x16"),
        "zero batch": (["generate", "--network", t / "corrupt-net.pt", "--batch", 0, "--outdir", t / "run" / "images"],
                       "--batch: must be >= 1, got 0"),
        "negative num": (["fid", "--network", t / "corrupt-net.pt", "--ref", t / "ref.npz", "-n", -4],
                         "--num: must be >= 2, got -4"),
        "corrupt checkpoint": (["fid", "--network", t / "corrupt-net.pt", "--ref", t / "ref.npz",
                                "--outdir", t / "run", "--device", "cpu"], "corrupt-net.pt"),
    }
    texts = assert_one_line_errors("08_evaluate_fid.py", [argv for argv, _ in cases.values()], t, prefix=[])
    for (name, (_, expected)), text in zip(cases.items(), texts):
        error_line = next(line for line in text.splitlines() if "error:" in line)
        assert expected in error_line, f"{name}: {error_line}"
    assert snapshot(t / "run") == before
    assert not os.path.exists(t / "out"), "a failing run wrote into the default output folder"


def test_solver_choices_are_09s_and_the_library_loads_no_later_chapter(fid, load):
    generate = subparsers(fid.build_parser())["generate"]
    (solver,) = [a for a in generate._actions if "--solver" in a.option_strings]
    assert list(solver.choices) == list(load("09_fast_samplers").SOLVERS)
    # Importing 08 loads no other chapter (FID needs common.py alone); generation loads 04 and 06, and each
    # flag its own chapter, only when the command line runs.
    chapters = lambda: sorted(name for name in sys.modules if re.fullmatch(r"\d\d_\w+", name))
    saved = {name: sys.modules.pop(name) for name in chapters()}    # as if no chapter had been loaded
    try:
        load("08_evaluate_fid")
        assert chapters() == ["08_evaluate_fid"], f"importing 08 loaded {chapters()}"
    finally:
        for name in chapters():
            del sys.modules[name]
        sys.modules.update(saved)
