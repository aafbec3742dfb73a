"""Training on your own data (issue 21): EDM's data constants measured and settable, carried to sampling."""
import json
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import common

SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
         "--lr-rampup", "0.0002", "--device", "cpu", "--duration", "0.000032"]


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def test_data_std_is_the_per_pixel_std_in_minus_one_to_one(T):
    levels = torch.arange(256, dtype=torch.uint8)                        # every grey level once per image
    images = levels.view(1, 1, 16, 16).expand(64, 3, 16, 16).clone()
    data = T.TrainingSet("ramp", images, torch.zeros([64, 0]), [], xflip=False)
    n = images.numel()                                                   # sample std of n values
    exact = ((levels.double() / 127.5 - 1).var(unbiased=False) * n / (n - 1)).sqrt().item()
    assert T.data_std(data) == pytest.approx(exact, rel=1e-9) and exact == pytest.approx(0.5796, abs=1e-4)
    binary = torch.randint(0, 2, (64, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8) * 255
    assert T.data_std(T.TrainingSet("binary", binary, torch.zeros([64, 0]), [], False)) == pytest.approx(1, abs=0.01)



def test_data_std_of_a_large_set_is_measured_on_images_spread_over_all_of_it(T):
    # A set sorted by class (here: 32 black-and-white images, then 32 grey ones) must not be measured on its
    # first class only when it is larger than max_images.
    binary = torch.randint(0, 2, (32, 3, 8, 8), generator=torch.Generator().manual_seed(1)).to(torch.uint8) * 255
    grey = torch.full((32, 3, 8, 8), 128, dtype=torch.uint8)
    data = T.TrainingSet("sorted", torch.cat([binary, grey]), torch.zeros([64, 0]), [], xflip=False)
    everything = T.data_std(data)                         # 64 images <= max_images: all of them
    assert everything == pytest.approx(0.5 ** 0.5, abs=0.02)
    assert T.data_std(data, max_images=8) == pytest.approx(everything, abs=0.02)       # 4 of each half

def test_sigma_data_p_mean_p_std_reach_the_loss_the_network_and_the_snapshot(T, load, tmp_path, capsys, one_thread):
    args = T.parse_args(SMALL + ["--sigma-data", "0.3", "--P-mean", "-0.8", "--P-std", "1.5"])
    loss = T.loss_function(args)
    assert (loss.sigma_data, loss.P_mean, loss.P_std) == (0.3, -0.8, 1.5)
    defaults = T.loss_function(T.parse_args(SMALL))                     # the presets keep the paper's values
    assert (defaults.sigma_data, defaults.P_mean, defaults.P_std) == (0.5, -1.2, 1.2)

    T.main(SMALL + ["--sigma-data", "0.3", "--outdir", str(tmp_path)])
    printed = capsys.readouterr()
    with open(tmp_path / "training_options.json") as f:
        options = json.load(f)
    assert options["sigma_data"] == 0.3 and options["network"]["kwargs"]["sigma_data"] == 0.3
    assert f"per-pixel std {options['data_std']:.3f}" in printed.out
    assert "warning:" in printed.err and "--sigma-data 0.45" in printed.err      # shapes: std 0.448, not 0.3
    net = load("06_unet").load_network(str(tmp_path / "network-snapshot-000000.pt"))
    assert net.sigma_data == 0.3
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 2.0])
    c_skip, c_out, c_in, _ = net.scalings(sigma.view(-1, 1, 1, 1))      # Table 1's EDM column with sigma_data 0.3
    torch.testing.assert_close(c_skip.flatten(), 0.09 / (sigma ** 2 + 0.09))


def test_no_warning_when_sigma_data_fits(T, tmp_path, capsys, one_thread):
    T.main(SMALL + ["--sigma-data", "0.45", "--outdir", str(tmp_path)])
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--sigma-data", "--P-mean", "--P-std"])
def test_edm_constants_with_another_preconditioning_are_one_error_line(T, option):
    # VP/VE/iDDPM have their own noise distributions and no sigma_data: any of EDM's three would be ignored.
    with pytest.raises(SystemExit, match=f"error: --sigma-data, --P-mean and --P-std are EDM's constants; "
                                         f"--precond vp has its own"):
        T.parse_args(SMALL + ["--precond", "vp", option, "0.7"])
    T.parse_args(SMALL + ["--precond", "vp"])            # the defaults are not a complaint


# ----------------------------------------------------------------------------
# Any image size: --resolution center-crops and resizes as the official dataset_tool.py (issue 21, item 2).

def write_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array, mode).save(path)


def official_center_crop(array, r):
    """The official tool's center-crop transform, written out: central min(h, w) square by its index rule,
    greyscale repeated to RGB, PIL LANCZOS resize to r x r; HWC uint8 in and out."""
    h, w = array.shape[:2]
    c = min(h, w)
    array = array[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2]
    array = np.repeat(array[:, :, None], 3, 2) if array.ndim == 2 else array
    return np.array(PIL.Image.fromarray(array, "RGB").resize((r, r), PIL.Image.Resampling.LANCZOS))


def mixed_folder(tmp_path):
    """Four classes of one image each: 8x8 RGB (kept), 13x9 RGB (portrait), 10x17 RGB (landscape), 12x12 grey."""
    rng = np.random.default_rng(0)
    arrays = {"a/same.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
              "b/tall.png": rng.integers(0, 256, (13, 9, 3), dtype=np.uint8),
              "c/wide.png": rng.integers(0, 256, (10, 17, 3), dtype=np.uint8),
              "d/grey.png": rng.integers(0, 256, (12, 12), dtype=np.uint8)}
    for name, array in arrays.items():
        write_png(str(tmp_path / "mixed" / name), array)
    return str(tmp_path / "mixed"), arrays


def test_mixed_sizes_are_cropped_and_resized_as_the_official_tool(tmp_path):
    folder, arrays = mixed_folder(tmp_path)
    f = common.load("08_evaluate_fid").ImageFolder(folder, resolution=8)
    images = f.batch(range(len(f)))
    assert images.shape == (4, 3, 8, 8) and f.names == sorted(arrays)
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), arrays["a/same.png"])      # already 8x8: untouched
    for i, name in enumerate(f.names):
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), official_center_crop(arrays[name], 8)), name
    assert f.resized == {1, 2, 3}
    # the crop is the centre (not a squash): a landscape image's left and right borders are cut away
    assert not np.array_equal(images[2].permute(1, 2, 0).numpy(),
                              np.array(PIL.Image.fromarray(arrays["c/wide.png"]).resize((8, 8), PIL.Image.LANCZOS)))


def test_07_trains_mixed_sizes_at_resolution_and_no_resize_keeps_the_strict_check(T, tmp_path, capsys, one_thread):
    folder, arrays = mixed_folder(tmp_path)
    argv = ["--data", folder, "--cond", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "4",
            "--duration", "0.000004", "--device", "cpu"]
    T.main(argv + ["--outdir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "3 of 4 images center-cropped and resized to 8x8" in out and "4 images 8x8x3, 4 classes" in out
    data = T.load_dataset(T.parse_args(argv))
    assert torch.equal(data.images[1].permute(1, 2, 0), torch.from_numpy(official_center_crop(arrays["b/tall.png"], 8)))
    with pytest.raises(ValueError, match="'b/tall.png' is 9x13 but 'a/same.png' is 8x8"):
        T.load_dataset(T.parse_args(argv + ["--no-resize"]))


def test_transparency_is_refused_and_a_broken_file_named(tmp_path):
    write_png(str(tmp_path / "rgba" / "a.png"), np.zeros((8, 8, 4), np.uint8), "RGBA")       # alpha 0: clear
    with pytest.raises(ValueError, match="'a.png' .* is transparent .* composite it on a background"):
        common.load("08_evaluate_fid").ImageFolder(str(tmp_path / "rgba"), resolution=8)
    write_png(str(tmp_path / "broken" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "broken" / "b.jpg").write_bytes(b"GIF89a but not really")
    with pytest.raises(ValueError, match="cannot read image 'b.jpg'"):
        common.load("08_evaluate_fid").ImageFolder(str(tmp_path / "broken"), resolution=8).read(1)


def test_bad_data_options_are_one_error_line_and_write_nothing(tmp_path, assert_one_line_errors):
    write_png(str(tmp_path / "rgba" / "a.png"), np.zeros((8, 8, 4), np.uint8), "RGBA")
    write_png(str(tmp_path / "broken" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    run = tmp_path / "run"
    texts = assert_one_line_errors("07_train_cifar10.py", [
        ["--preset", "tiny", "--sigma-data", "0"],
        ["--data", tmp_path / "broken", "--resolution", "8", "--cres", "1,2", "--device", "cpu"],
        ["--data", tmp_path / "empty", "--cres", "1,2", "--device", "cpu"],
        ["--data", tmp_path / "rgba", "--resolution", "8", "--cres", "1,2", "--device", "cpu"],
    ], tmp_path, outdir=run)
    assert "--sigma-data" in texts[0] and "'b.png'" in texts[1] and "no images" in texts[2] and "'a.png'" in texts[3]
    assert not run.exists()


# ----------------------------------------------------------------------------
# sigma_data survives snapshot -> 08 (issue 21, item 1).

def test_08_generate_samples_with_the_snapshots_sigma_data(T, load, fid, tmp_path, one_thread):
    T.main(SMALL + ["--sigma-data", "0.3", "--outdir", str(tmp_path / "run")])
    ch06 = load("06_unet")
    snapshot = str(tmp_path / "run" / "network-snapshot-000000.pt")
    forced = ch06.load_network(snapshot)
    config = forced.init_config                                # the same weights with 0.5: what 08 would
    forced.init_config = dict(config, kwargs=dict(config["kwargs"], sigma_data=0.5))   # sample with if it fell back
    ch06.save_network(forced, str(tmp_path / "forced.pt"))
    assert ch06.load_network(str(tmp_path / "forced.pt")).sigma_data == 0.5
    pngs = {}
    for name, path in [("own", snapshot), ("forced", str(tmp_path / "forced.pt"))]:
        fid.main(["generate", "--network", path, "--seeds", "0-1", "--steps", "4", "--device", "cpu",
                  "--outdir", str(tmp_path / name)])
        pngs[name] = [np.array(PIL.Image.open(tmp_path / name / f"{s:06d}.png")) for s in (0, 1)]
    expected = fid.generate_batch(ch06.load_network(snapshot).eval(), [0, 1], "cpu", fid.common.load("04_stochastic_sampler").make_sampler(4))
    assert ch06.load_network(snapshot).sigma_data == 0.3
    for s in (0, 1):
        assert np.array_equal(pngs["own"][s], expected[s].permute(1, 2, 0).numpy())
        assert not np.array_equal(pngs["own"][s], pngs["forced"][s])     # sigma_data 0.5 gives other images


def test_an_image_only_cropped_counts_as_changed(tmp_path):
    # 8x12 at --resolution 8: the central 8x8 square is kept without resizing, but the image did change.
    write_png(str(tmp_path / "crop" / "a.png"), np.arange(8 * 12 * 3, dtype=np.uint8).reshape(12, 8, 3))
    f = common.load("08_evaluate_fid").ImageFolder(str(tmp_path / "crop"), resolution=8)
    assert np.array_equal(f.read(0).transpose(1, 2, 0), np.arange(8 * 12 * 3, dtype=np.uint8).reshape(12, 8, 3)[2:10])
    assert f.resized == {0}


# ----------------------------------------------------------------------------
# Images as users have them (issue 28): greyscale scans, a few saved as RGB or as RGBA with an alpha channel
# that is 255 everywhere. 07 and 08's ref and calc read them with one reader, and say once per run how many
# alpha channels they dropped.

def scans(tmp_path, size=(12, 12), odd_size=(12, 12), colour=True):
    """Eight greyscale scans; two more saved as RGB (a tint) if `colour`, and two as opaque alpha (RGBA if colour,
    else LA) at `odd_size`. Returns the folder and {name: the image as RGB, HWC}."""
    rng, want = np.random.default_rng(4), {}
    for i in range(12 if colour else 10):
        grey = rng.integers(0, 256, odd_size if i >= 8 else size, dtype=np.uint8)
        rgb = np.dstack([grey, grey, grey // 2]) if colour and i in (8, 9) else np.repeat(grey[:, :, None], 3, 2)
        array, mode = ((rgb, "RGB") if i < 10 else (rgba(rgb), "RGBA")) if colour and i >= 8 else \
            ((grey, "L") if i < 8 else (np.dstack([grey, np.full_like(grey, 255)]), "LA"))
        write_png(str(tmp_path / "scans" / f"{i:02d}.png"), array, mode)
        want[f"{i:02d}.png"] = rgb
    return str(tmp_path / "scans"), want


def rgba(rgb):
    return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])


def test_07_trains_on_grey_rgb_and_opaque_rgba_files_and_notes_the_dropped_alpha_once(T, tmp_path, capsys):
    folder, want = scans(tmp_path, odd_size=(10, 14))
    data = T.load_dataset(T.parse_args(["--data", folder, "--resolution", "8", "--cres", "1,2"]))
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "note: dropped the opaque alpha channel (all 255) of 2 image file(s)" in out
    assert data.images.shape == (12, 3, 8, 8)           # a colour file among greyscale ones: all read as RGB
    for i, name in enumerate(sorted(want)):
        assert np.array_equal(data.images[i].permute(1, 2, 0).numpy(), official_center_crop(want[name], 8)), name


def test_07_keeps_a_greyscale_folder_greyscale_at_any_resolution(T, tmp_path, capsys):
    folder, want = scans(tmp_path, odd_size=(10, 14), colour=False)      # greyscale, two with an opaque alpha
    data = T.load_dataset(T.parse_args(["--data", folder, "--resolution", "8", "--cres", "1,2"]))
    assert data.images.shape == (10, 1, 8, 8) and data.channels == 1
    for i, name in enumerate(sorted(want)):             # the official pixels, one channel
        assert np.array_equal(data.images[i, 0].numpy(), official_center_crop(want[name], 8)[:, :, 0]), name
    assert "of 2 image file(s)" in capsys.readouterr().out


class PooledPixels(torch.nn.Module):
    """A detector file for the test: 4x4-pooled pixels (48 features), called as NVIDIA's TorchScript."""

    def __init__(self):
        super().__init__()
        self.feature_dim = 48

    def forward(self, x, return_features: bool = False):
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def test_08_ref_and_calc_read_such_a_folder_as_07_and_note_the_dropped_alpha_once(fid, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # "torch.jit is deprecated": 08 reads TorchScript detectors
        torch.jit.save(torch.jit.script(PooledPixels()), str(tmp_path / "det.pt"))
    folder, want = scans(tmp_path)
    for name, rgb in want.items():                         # its all-RGB version
        write_png(str(tmp_path / "rgb" / name), rgb)
    common_args = ["--detector", str(tmp_path / "det.pt"), "--batch", "5", "--device", "cpu"]
    fid.main(["ref", "--data", folder, "--dest", str(tmp_path / "ref.npz")] + common_args)
    assert capsys.readouterr().out.count("note: dropped the opaque alpha channel (all 255) of 2 image file(s)") == 1
    detector = fid.load_detector(str(tmp_path / "det.pt"), "cpu")
    mu, sigma = fid.image_stats(fid.ImageFolder(str(tmp_path / "rgb")), np.arange(12), detector, 5, "cpu")
    with np.load(tmp_path / "ref.npz") as ref:
        np.testing.assert_array_equal(ref["mu"], mu)
        np.testing.assert_array_equal(ref["sigma"], sigma)
    fid.main(["calc", "--images", folder, "--ref", str(tmp_path / "ref.npz"), "-n", "12"] + common_args)
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "of 2 image file(s)" in out
    assert abs(float(out.split("FID")[-1])) < 1e-6       # the very images of the reference
