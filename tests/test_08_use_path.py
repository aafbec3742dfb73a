"""The newcomer's path after 07 (issue 23): `generate` never overwrites and records what made its images,
FID for the default run (tiny train -> ref --data shapes -> fid, as the README says), --ref checked before
any detector download, the label-dropout warning, clear messages, and one style of option names."""
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")


class PooledPixels(torch.nn.Module):
    """A detector file the tests make: 2x2-pooled pixels (12 features), called as NVIDIA's TorchScript."""

    def __init__(self):
        super().__init__()
        self.feature_dim = 12

    def forward(self, x, return_features: bool = False):
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("detector") / "pooled.pt")
    torch.jit.save(torch.jit.script(PooledPixels()), path)
    return path


def run(fid, *args):
    fid.main([str(a) for a in args] + ["--device", "cpu"])


def files(folder):
    """{relative path: bytes} of everything under folder."""
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, names in os.walk(folder) for f in names}


def one_error_line(excinfo):
    text = str(excinfo.value)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


# ----------------------------------------------------------------------------
# generate: never overwrites; grid.png and generation.json.

def test_generate_refuses_a_used_folder_adds_with_add_and_records_every_setting(fid, tiny_network, tmp_path):
    out = tmp_path / "images"
    run(fid, "generate", "--network", tiny_network, "--seeds", "0-9", "--steps", 2, "--S-churn", 5, "--outdir", out)
    assert sorted(os.listdir(out)) == [f"{s:06d}.png" for s in range(10)] + ["generation.json", "grid.png"]
    (entry,) = json.loads((out / "generation.json").read_text())
    assert entry["network"] == os.path.abspath(tiny_network) and entry["seeds"] == "0-9" and entry["num_images"] == 10
    assert entry["sampler"] == {"function": "edm_sampler", "options": {"num_steps": 2, "sigma_min": 0.002,
                                                                       "sigma_max": 80, "rho": 7, "S_churn": 5.0}}
    assert (entry["solver"], entry["sigma_steps"], entry["nfe"], entry["network_evaluations"]) == ("heun", "edm", 3, 3)
    assert entry["guidance"]["method"] == "none" and entry["class_idx"] is None and entry["subdirs"] is False
    with PIL.Image.open(out / "grid.png") as grid:    # 8 of the 10 images: whole rows of 8, sharp pixels
        assert grid.size[0] >= 8 * 16
    before = files(out)

    # The README's next step, a fast solver into the same (default) folder, replaced the images: now an error.
    with pytest.raises(SystemExit) as excinfo:
        run(fid, "generate", "--network", tiny_network, "--seeds", "0-9", "--solver", "ipndm", "--nfe", 3, "--outdir", out)
    assert "--add" in one_error_line(excinfo) and "new --outdir" in str(excinfo.value)
    with pytest.raises(SystemExit) as excinfo:                   # --add never replaces an image either
        run(fid, "generate", "--network", tiny_network, "--seeds", "8-12", "--steps", 2, "--outdir", out, "--add")
    assert "000008.png exists (2 of these seeds' images do)" in one_error_line(excinfo)
    assert files(out) == before

    # --add with new seeds: the old images stay as they were, one more settings entry, the grid redrawn.
    run(fid, "generate", "--network", tiny_network, "--seeds", "10-15", "--solver", "euler", "--steps", 2, "--outdir", out,
        "--add", "--class", 1)
    after = files(out)
    assert all(after[name] == data for name, data in before.items() if name.endswith(".png") and name != "grid.png")
    assert sorted(n for n in after if n[:6].isdigit()) == [f"{s:06d}.png" for s in range(16)]
    first, second = json.loads((out / "generation.json").read_text())
    assert first == entry and (second["seeds"], second["solver"], second["class_idx"]) == ("10-15", "euler", 1)
    assert after["grid.png"] != before["grid.png"]              # now 16 images: two rows

    # calc and ref read the 16 generated images, not grid.png.
    assert len(fid.ImageFolder(str(out))) == 16 and "grid.png" not in fid.ImageFolder(str(out)).names


def test_subdirs_put_seed_s_in_the_folder_of_s_minus_s_mod_1000(fid, tiny_network, tmp_path):
    # The official generate.py's layout: one folder per 1000 seeds, named by the first of them.
    out = tmp_path / "images"
    run(fid, "generate", "--network", tiny_network, "--seeds", "999-1001", "--steps", 2, "--outdir", out, "--subdirs")
    assert sorted(name for name in files(out) if name[:6].isdigit()) == [
        os.path.join("000000", "000999.png"), os.path.join("001000", "001000.png"), os.path.join("001000", "001001.png")]
    assert len(fid.ImageFolder(str(out))) == 3                    # calc and ref find them


def test_add_with_subdirs_refuses_the_seeds_whose_images_are_in_the_subfolders(fid, tiny_network, tmp_path):
    out = tmp_path / "images"
    run(fid, "generate", "--network", tiny_network, "--seeds", "999-1001", "--steps", 2, "--outdir", out, "--subdirs")
    before = files(out)
    with pytest.raises(SystemExit) as excinfo:        # 1001's image is in 001000/: --add never replaces it
        run(fid, "generate", "--network", tiny_network, "--seeds", "1001-1002", "--steps", 3, "--outdir", out,
            "--subdirs", "--add")
    assert f"{os.path.join('001000', '001001.png')} exists (1 of these seeds' images do)" in one_error_line(excinfo)
    assert files(out) == before
    run(fid, "generate", "--network", tiny_network, "--seeds", "1002", "--steps", 3, "--outdir", out, "--subdirs",
        "--add")                                      # a new seed goes in beside them
    after = files(out)
    assert {name: after[name] for name in before if name[:6].isdigit()} == \
        {name: data for name, data in before.items() if name[:6].isdigit()}
    assert os.path.join("001000", "001002.png") in after


def test_outdir_that_is_a_file_is_one_clear_line(fid, tiny_network, detector_file, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(12), sigma=np.eye(12))
    monkeypatch.setattr(fid, "generated_stats", lambda *args, **kwargs: pytest.fail("fid generated before it "
                                                                                     "checked --outdir"))
    for argv in (["generate", "--network", tiny_network, "--seeds", "0", "--outdir", tmp_path / "taken"],
                 ["demo", "--outdir", tmp_path / "taken" / "sub"],
                 ["fid", "--network", tiny_network, "--ref", tmp_path / "ref.npz", "--detector", detector_file,
                  "-n", 2, "--outdir", tmp_path / "taken"]):     # fails before generating, not after
        with pytest.raises(SystemExit) as excinfo:
            run(fid, *argv)
        assert "is (or lies inside) a file, not a folder; pass a folder" in one_error_line(excinfo)
        assert "Errno" not in str(excinfo.value)
    assert (tmp_path / "taken").read_text() == "a file"


# ----------------------------------------------------------------------------
# FID for the default run, as the README's "your own model" recipe says.

def test_readme_recipe_default_run_ref_shapes_then_fid(fid, load, tiny_network, detector_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(fid, "ref", "--data", "shapes", "--dest", "fid-refs/shapes16.npz", "--detector", detector_file,
        "--batch", 1024)
    run(fid, "fid", "--network", tiny_network, "--ref", "fid-refs/shapes16.npz", "-n", 8, "--repeats", 1, "--steps", 2,
        "--detector", detector_file)
    result = json.loads((tmp_path / "out" / "08_evaluate_fid" / "fid.json").read_text())
    assert result["nfe"] == 3 and np.isfinite(result["fid_min"]) and result["fid_min"] > 0

    # The reference is the statistics of the very images 07 trained on (07's load_dataset, default run).
    train = load("07_train_cifar10")
    data = train.load_dataset(train.parse_args([]))
    detector = fid.load_detector(detector_file, "cpu")
    want = fid.image_stats(data.images, np.arange(len(data.images)), detector, 1024, "cpu")
    with np.load(tmp_path / "fid-refs" / "shapes16.npz") as ref:
        np.testing.assert_allclose(ref["mu"], want[0], rtol=1e-12)
        np.testing.assert_allclose(ref["sigma"], want[1], rtol=1e-10, atol=1e-12)
    # --resolution draws the shapes at another size and resizes a folder's images as 07 does when it trains on them
    # (one reader, one rule); CIFAR-10 is 32x32 only.
    assert fid.open_images("shapes", None, 8).shape[1:] == (3, 8, 8)                 # a uint8 tensor, as 07 draws it
    folder = _pngs(tmp_path / "pngs")
    trained = train.load_dataset(train.parse_args(["--data", folder, "--resolution", "32", "--no-cond",
                                                   "--outdir", str(tmp_path / "run")])).images
    ref = fid.open_images(folder, None, 32)
    assert trained.shape == (2, 3, 32, 32) and torch.equal(images_of(ref), trained)
    with pytest.raises(ValueError, match="CIFAR-10's images are 32x32, not --resolution 16"):
        fid.open_images("cifar10", str(tmp_path), 16)


def _pngs(folder):
    os.makedirs(folder)
    for i in range(2):
        PIL.Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / f"{i}.png")
    return str(folder)


def images_of(folder):
    return folder.batch(range(len(folder)))


@pytest.mark.parametrize("command", ["calc", "fid"])
def test_ref_is_checked_before_the_detector_is_loaded(fid, tiny_network, command, tmp_path, monkeypatch):
    def no_download(spec, device):
        raise AssertionError("the detector was loaded before --ref was checked")
    monkeypatch.setattr(fid, "load_detector", no_download)
    np.savez(tmp_path / "small.npz", mu=np.zeros(6), sigma=np.eye(6))
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    source = ["--images", _pngs(tmp_path / "pngs"), "-n", 2] if command == "calc" else \
        ["--network", tiny_network, "-n", 2, "--steps", 2, "--outdir", tmp_path / "result"]
    for ref, complaint in [("missing.npz", "reference statistics not found"),
                           ("junk.npz", "is not a reference .npz"),
                           ("small.npz", "6-d statistics but the detector gives 2048-d")]:
        with pytest.raises(SystemExit) as excinfo:
            run(fid, command, *source, "--ref", tmp_path / ref)          # --detector nvidia: a download
        assert complaint in one_error_line(excinfo), ref
    assert not (tmp_path / "result").exists()


# ----------------------------------------------------------------------------
# Guidance: the label-dropout warning and the cost of guidance in the done line.

def test_cfg_on_a_run_without_label_dropout_warns_once(fid, load, tiny_network, tmp_path, capsys):
    quick = ("--seeds", "0-1", "--steps", 2)
    run(fid, "generate", "--network", tiny_network, *quick, "--guidance", 2, "--outdir", tmp_path / "cfg")
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--label-dropout 0" in warnings[0] and "--guide-network" in warnings[0]
    assert "each guided call evaluates two networks" in captured.out    # 3 NFE, 6 network evaluations
    assert "3 NFE per image (measured; 6 network evaluations" in captured.out

    # No warning: autoguidance, no guidance, or a run trained with label dropout.
    run(fid, "generate", "--network", tiny_network, *quick, "--guidance", 2, "--guide-network", tiny_network,
        "--outdir", tmp_path / "auto")
    run(fid, "generate", "--network", tiny_network, *quick, "--outdir", tmp_path / "plain")
    run(fid, "generate", "--network", tiny_network, *quick, "--guidance", 1, "--guidance-interval", "0.3,3",
        "--outdir", tmp_path / "w1")                                 # w = 1 through 10's guidance(): unguided
    captured = capsys.readouterr()
    assert "warning:" not in captured.err and "guided call" not in captured.out.split("auto")[-1]
    # (07 records label_dropout in a snapshot's network configuration when it is > 0; 10 reads it there.)
    snapshot = torch.load(tiny_network, map_location="cpu", weights_only=True)
    assert "label_dropout" not in snapshot["kwargs"]                   # the tiny run: no label dropout
    snapshot["kwargs"]["label_dropout"] = 0.1
    torch.save(snapshot, tmp_path / "dropout.pt")
    run(fid, "generate", "--network", tmp_path / "dropout.pt", *quick, "--guidance", 2,
        "--outdir", tmp_path / "cfg_dropout")
    assert "warning:" not in capsys.readouterr().err

    # 10's network mode warns the same way.
    guidance = load("10_guidance")
    guidance.network_grid(guidance.parse_args(["--network", tiny_network, "--seeds", "0", "--network-steps", "2",
                                               "--outdir", str(tmp_path / "grid")]), "cpu")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--label-dropout 0" in warnings[0]


# ----------------------------------------------------------------------------
# Option names: dashes everywhere, the paper's symbols in their case, the old spellings kept.

def test_dashed_sampler_options_and_their_underscore_aliases(fid):
    parse = lambda *argv: vars(fid.build_parser().parse_args(["generate", "--network", "n.pt", *argv]))
    dashed = parse("--sigma-min", "0.01", "--sigma-max", "40", "--S-churn", "5", "--S-min", "0.1", "--S-max", "9",
                   "--S-noise", "1.003")
    old = parse("--sigma_min", "0.01", "--sigma_max", "40", "--S_churn", "5", "--S_min", "0.1", "--S_max", "9",
                "--S_noise", "1.003")
    assert dashed == old and dashed["sigma_min"] == 0.01 and dashed["S_churn"] == 5.0
    usage = fid.build_parser()._subparsers._group_actions[0].choices["generate"].format_usage()
    assert "--sigma-min" in usage and "--S-churn" in usage and "_churn" not in usage.replace("S_CHURN", "")


def test_07_units_follow_one_rule_stated_in_help(load):
    train = load("07_train_cifar10")
    parser = train.build_parser("tiny")
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for option in ("--duration", "--lr-rampup", "--ema"):
        assert "Mimg" in helps[option] and "kimg" not in helps[option].split("(default")[0], option
    for option in ("--tick", "--snap", "--stop-kimg"):
        assert "kimg" in helps[option] and "Mimg" not in helps[option], option
    assert "in Mimg" in parser.epilog and "in kimg" in parser.epilog
