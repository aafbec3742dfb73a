"""tools/nearest.py (issue 21; 08's `nearest` until issue 27): the memorisation check -- each generated image's two
nearest training images in pixel space, near-copy when d1 < d2 / 3 (Carlini et al. 2023)."""
import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import nearest
    return nearest


@pytest.fixture(scope="module")
def shapes(load):
    """07's shapes at 8x8: 64 training images and 16 held-out ones (another seed)."""
    make = load("07_train_cifar10").make_shapes_dataset
    return make(64, 8, seed=0)[0], make(16, 8, seed=1)[0]


def write_folder(path, images):
    os.makedirs(path, exist_ok=True)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(path, f"{i:03d}.png"))
    return str(path)


def test_nearest_two_are_the_two_smallest_rms_distances(tool, shapes):
    train, held_out = shapes
    d, idx = tool.nearest_two(held_out, train, chunk=10)       # several chunks
    full = ((held_out.double().flatten(1)[:, None] - train.double().flatten(1)[None]) ** 2).mean(2).sqrt()
    exact_d, exact_idx = full.sort(1)
    torch.testing.assert_close(d, exact_d[:, :2])
    assert torch.equal(idx, exact_idx[:, :2])


def test_copies_are_flagged_and_held_out_images_are_not(tool, shapes, tmp_path, capsys):
    train, held_out = shapes
    data = write_folder(tmp_path / "train", train)
    copies = train[[3, 17, 40, 41]]
    checked = write_folder(tmp_path / "generated", torch.cat([copies, held_out[:4]]))
    tool.main(["--images", checked, "--data", data, "--outdir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "nearest.json") as f:
        result = json.load(f)
    assert [r["near_copy"] for r in result["per_image"]] == [True] * 4 + [False] * 4
    assert [r["nearest"][0] for r in result["per_image"][:4]] == [3, 17, 40, 41]
    assert result["near_copies"] == 4 and result["near_copy_fraction"] == 0.5
    assert "Near-copies (d1 < d2 / 3, Carlini et al. 2023): 4 of 8 = 50.0%" in capsys.readouterr().out
    assert PIL.Image.open(tmp_path / "out" / "nearest.png").size[0] > 200

    d, _ = tool.nearest_two(held_out, train)      # real images the network never saw
    assert not tool.near_copies(d).any()


def test_the_grid_shows_the_most_copy_like_images_first(tool, load, shapes, tmp_path, monkeypatch):
    # nearest.png's rows are the --rows images of smallest d1 / d2, most copy-like first: an exact copy (d1 = 0),
    # planted last among held-out images, is the first row, beside the training image it copies.
    train, held_out = shapes
    data = write_folder(tmp_path / "train", train)
    checked = write_folder(tmp_path / "generated", torch.cat([held_out[:5], train[[17]]]))
    ch07, drawn = load("07_train_cifar10"), []
    save_grid = ch07.save_grid
    monkeypatch.setattr(ch07, "save_grid", lambda grid, *args, **kwargs: drawn.append((grid, kwargs["row_labels"]))
                        or save_grid(grid, *args, **kwargs))
    tool.main(["--images", checked, "--data", data, "--rows", "3", "--outdir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "nearest.json") as f:
        per_image = json.load(f)["per_image"]
    (grid, labels), = drawn
    assert grid.shape == (3 * 3, 3, 8, 8) and len(labels) == 3           # rows of (generated, 1st, 2nd nearest)
    assert torch.equal(grid[0], train[17]) and torch.equal(grid[1], train[17]), labels
    assert labels[0].startswith("005.png: 0.0 |") and labels[0].endswith(" copy")
    ratio = {r["name"]: r["d1"] / r["d2"] for r in per_image}
    shown = [label.split(":")[0] for label in labels]
    assert shown == sorted(ratio, key=ratio.get)[:3], (shown, ratio)
    assert PIL.Image.open(tmp_path / "out" / "nearest.png").size[0] > 200


def test_nearest_generates_with_a_network(tool, fid, load, shapes, tmp_path, one_thread):
    torch.manual_seed(0)
    unet = load("06_unet")
    net = unet.from_official_config("EDMPrecond", dict(img_resolution=8, img_channels=3, label_dim=0,
                                    model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                    attn_resolutions=[], embedding_type="positional", encoder_type="standard",
                                    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1]))
    unet.save_network(net, str(tmp_path / "net.pt"))
    tool.main(["--network", str(tmp_path / "net.pt"), "--seeds", "0-2", "--steps", "2", "--data",
              write_folder(tmp_path / "train", shapes[0][:8]), "--device", "cpu", "--outdir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "nearest.json") as f:
        result = json.load(f)
    expected = fid.generate_batch(net.eval(), [0, 1, 2], "cpu", fid.common.load("04_stochastic_sampler").make_sampler(2))
    d, _ = tool.nearest_two(expected, shapes[0][:8])
    assert [r["name"] for r in result["per_image"]] == ["seed 0", "seed 1", "seed 2"]
    assert [r["d1"] for r in result["per_image"]] == d[:, 0].tolist()


def test_bad_input_is_one_error_line_and_overwrites_nothing(shapes, tmp_path, assert_one_line_errors):
    data = write_folder(tmp_path / "train", shapes[0][:8])
    broken = write_folder(tmp_path / "broken", shapes[1][:2])
    with open(os.path.join(broken, "002.png"), "wb") as f:
        f.write(b"not a png")
    (tmp_path / "empty").mkdir()
    wide = str(tmp_path / "wide")
    os.makedirs(wide)
    for i in range(2):
        PIL.Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(os.path.join(wide, f"{i}.png"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "nearest.png").write_bytes(b"earlier result")
    texts = assert_one_line_errors("tools/nearest.py", [
        ["--images", broken],                                            # no --data
        ["--images", broken, "--data", data],
        ["--images", data, "--data", tmp_path / "empty"],
        ["--data", data],                                                # neither --network nor --images
        ["--images", wide, "--data", data],                             # 8x16 against 16x16 training images
    ], tmp_path, prefix=["--outdir", out])
    assert "--data" in texts[0] and "'002.png'" in texts[1] and "no images" in texts[2]
    assert "--network" in texts[3] and "(16, 16) (H, W) but the generated ones (8, 16)" in texts[4]
    assert "--data the network was trained on" in texts[4]
    assert os.listdir(out) == ["nearest.png"] and (out / "nearest.png").read_bytes() == b"earlier result"


def test_near_copy_criterion_is_d1_below_a_third_of_d2(tool):
    d = torch.tensor([[1.0, 2.9], [1.0, 3.1], [1.0, 2.5], [0.0, 0.1]], dtype=torch.float64)
    assert tool.near_copies(d).tolist() == [False, True, False, True]      # d1 < d2 / 3 (Carlini et al. 2023)


# ----------------------------------------------------------------------------
# The folders read as 07 reads them (issue 28): 08's ImageFolder for --images and --data alike, greyscale
# compared as RGB when the other side is RGB.

def save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array, mode).save(path)


def test_greyscale_copies_of_the_training_images_are_near_copies(tool, shapes, tmp_path, capsys):
    # The case: greyscale scans, two saved as RGB, one as RGBA with an opaque alpha: 07 reads the folder
    # as RGB. The user checks the check with greyscale copies of training images (1 channel) and held-out ones.
    train, held_out = shapes
    grey = [np.array(PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L")) for image in train[:24]]
    for i, g in enumerate(grey):
        rgb = np.repeat(g[:, :, None], 3, 2)
        array, mode = (rgb, "RGB") if i in (5, 9) else (np.dstack([rgb, np.full_like(g, 255)]), "RGBA") if i == 11 \
            else (g, "L")
        save(str(tmp_path / "train" / f"{i:03d}.png"), array, mode)
    copies = [3, 9, 11, 20]
    for k, i in enumerate(copies):
        save(str(tmp_path / "check" / f"{k}.png"), grey[i])
    for k, image in enumerate(held_out[:4]):
        save(str(tmp_path / "check" / f"{k + 4}.png"), np.array(PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
                                                               .convert("L")))
    tool.main(["--images", str(tmp_path / "check"), "--data", str(tmp_path / "train"), "--outdir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "nearest.json").read_text())
    assert [r["near_copy"] for r in result["per_image"]] == [True] * 4 + [False] * 4
    assert [r["nearest"][0] for r in result["per_image"][:4]] == copies
    assert [r["d1"] for r in result["per_image"][:4]] == [0.0] * 4          # grey repeated to RGB: lossless
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "opaque alpha channel (all 255) of 1 image file(s)" in out


def test_a_greyscale_training_set_is_compared_as_rgb_with_rgb_images(tool, shapes):
    train, held_out = shapes
    grey_train = train.float().mean(1, keepdim=True).round().to(torch.uint8)    # [64, 1, 8, 8]
    images = torch.cat([grey_train[[7, 30]], held_out[:2].float().mean(1, keepdim=True).round().to(torch.uint8)])
    d, idx = tool.nearest_two(images.expand(-1, 3, -1, -1), grey_train, chunk=10)   # RGB against greyscale
    want_d, want_idx = tool.nearest_two(images, grey_train)
    torch.testing.assert_close(d, want_d)                  # the same RMS distances: every channel is the grey one
    assert torch.equal(idx, want_idx) and idx[:2, 0].tolist() == [7, 30] and d[:2, 0].tolist() == [0, 0]


def test_images_written_by_generate_are_read_without_its_grid(tool, shapes, tmp_path):
    # 08 generate's folder holds grid.png (larger) beside generation.json: the README's `--images
    # out/08_evaluate_fid/images` reads the images only.
    train, held_out = shapes
    checked = write_folder(tmp_path / "images", held_out[:3])
    save(os.path.join(checked, "grid.png"), np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "images" / "generation.json").write_text("[]")
    tool.main(["--images", checked, "--data", write_folder(tmp_path / "train", train), "--outdir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "nearest.json").read_text())
    assert [r["name"] for r in result["per_image"]] == ["000.png", "001.png", "002.png"]
