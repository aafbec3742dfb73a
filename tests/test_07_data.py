"""The image reader 07 trains from and 08 measures FID on (08's ImageFolder: folder or zip, lazy), 07's labels,
CIFAR-10; and 07's use of it."""
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import common

ImageFolder = common.load("08_evaluate_fid").ImageFolder        # the one reader of image folders
folder_labels = common.load("07_train_cifar10").folder_labels     # labels are training's
IMAGE_EXTENSIONS = common.load("08_evaluate_fid").IMAGE_EXTENSIONS


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def zip_folder(folder, path):
    with zipfile.ZipFile(path, "w") as z:
        for root, _, files in os.walk(folder):
            for f in files:
                full = os.path.join(root, f)
                z.write(full, os.path.relpath(full, folder).replace(os.sep, "/"))
    return str(path)


def class_folders(tmp_path, size=(6, 5)):
    """Three classes in sub-folders, two RGB images each; returns the folder and {name: HWC array}."""
    rng = np.random.default_rng(0)
    pictures = {}
    for cls in ("cat", "dog", "emu"):
        for i in range(2):
            name = f"{cls}/{i}.png"
            pictures[name] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            write_png(str(tmp_path / "set" / name), pictures[name])
    return str(tmp_path / "set"), pictures


def test_folder_reads_sorted_names_lazily_as_chw_uint8(tmp_path):
    folder, pictures = class_folders(tmp_path)
    (tmp_path / "set" / "notes.txt").write_text("not an image")
    f = ImageFolder(folder)
    assert f.path == folder and f.names == sorted(pictures) and len(f) == 6
    for i, name in enumerate(f.names):
        image = f.read(i)
        assert image.dtype == np.uint8 and image.shape == (3, 6, 5)       # [C, H, W]
        assert np.array_equal(image.transpose(1, 2, 0), pictures[name])
    batch = f.batch([4, 0])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 6, 5)
    assert np.array_equal(batch[0].numpy(), f.read(4)) and np.array_equal(batch[1].numpy(), f.read(0))


def test_zip_equals_folder_and_subfolders_are_classes(tmp_path):
    folder, _ = class_folders(tmp_path)
    a, b = ImageFolder(folder), ImageFolder(zip_folder(folder, tmp_path / "set.zip"))
    assert a.names == b.names
    assert torch.equal(a.batch(range(len(a))), b.batch(range(len(b))))
    assert folder_labels(a).tolist() == folder_labels(b).tolist() == [0, 0, 1, 1, 2, 2]   # cat, dog, emu (sorted folders)


def test_dataset_json_labels_and_greyscale(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "set"
    for i in range(3):
        write_png(str(folder / "00000" / f"img{i:08d}.png"), rng.integers(0, 256, (4, 4), dtype=np.uint8))
    labels = [[f"00000/img{i:08d}.png", c] for i, c in zip([2, 0, 1], [7, 3, 5])]   # any order
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    f = ImageFolder(zip_folder(folder, tmp_path / "set.zip"))
    assert f.read(0).shape == (1, 4, 4)
    assert folder_labels(f).dtype == np.int64 and folder_labels(f).tolist() == [3, 5, 7]
    (folder / "dataset.json").write_text(json.dumps({"labels": None}))
    assert folder_labels(ImageFolder(str(folder))) is None


def test_flat_folder_has_no_labels_and_dataset_json_must_cover_every_image(tmp_path):
    for i in range(2):
        write_png(str(tmp_path / f"{i}.png"), np.zeros((4, 4, 3), np.uint8))
    assert folder_labels(ImageFolder(str(tmp_path))) is None
    for i in range(2):                                                # one sub-folder is one class: no labels either
        write_png(str(tmp_path / "one" / "cats" / f"{i}.png"), np.zeros((4, 4, 3), np.uint8))
    assert folder_labels(ImageFolder(str(tmp_path / "one"))) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["0.png", 1]]}))
    with pytest.raises(ValueError, match="no label for '1.png'"):
        folder_labels(ImageFolder(str(tmp_path)))


def test_bad_paths_and_images_raise_with_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a .zip"):
        ImageFolder(str(tmp_path / "file.txt"))

    mixed = tmp_path / "mixed"            # sizes are checked up front, from the headers, before anything is read
    write_png(str(mixed / "a.png"), np.zeros((8, 8, 3), np.uint8))
    write_png(str(mixed / "b.png"), np.zeros((16, 8, 3), np.uint8))
    write_png(str(mixed / "c.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"'b.png' is 8x16 but 'a.png' is 8x8; all images in .* must have one size"):
        ImageFolder(str(mixed))
    os.remove(mixed / "b.png")                            # one size: a greyscale image among RGB ones becomes RGB
    assert ImageFolder(str(mixed)).batch([0, 1]).shape == (2, 3, 8, 8)

    corrupt = tmp_path / "corrupt"
    write_png(str(corrupt / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (corrupt / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image 'b.png'"):
        ImageFolder(str(corrupt)).read(1)


def test_cifar10_offline_says_where_to_put_the_tarball(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(OSError) as error:
        common.load("07_train_cifar10").load_cifar10(str(tmp_path))
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message


def test_one_data_dir_and_extension_list(T):
    assert common.load("07_train_cifar10").DATA_DIR == os.path.join("out", "data")
    assert T.parse_args([]).data_dir == common.load("07_train_cifar10").DATA_DIR
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


# ----------------------------------------------------------------------------
# One rule for every image folder (issue 28), decided up front from the headers: channels are the folder's
# (all greyscale: 1; any colour: 3, greyscale repeated), with or without --resolution; an alpha channel that is
# 255 everywhere is dropped, real transparency refused; generate's grid.png is not one of the images.

def grey_and_rgb(tmp_path):
    """A folder of greyscale and RGB images, its all-RGB version (each greyscale one saved as RGB), and the arrays."""
    rng = np.random.default_rng(2)
    arrays = {f"{i}.png": rng.integers(0, 256, (6, 10) if i % 3 else (6, 10, 3), dtype=np.uint8) for i in range(6)}
    for name, a in arrays.items():
        write_png(str(tmp_path / "mixed" / name), a)
        write_png(str(tmp_path / "rgb" / name), a if a.ndim == 3 else np.repeat(a[:, :, None], 3, 2))
    return str(tmp_path / "mixed"), str(tmp_path / "rgb"), arrays


@pytest.mark.parametrize("resolution", [None, 6, 4])
def test_a_grey_and_rgb_folder_reads_as_its_all_rgb_version(tmp_path, resolution):
    mixed, rgb, arrays = grey_and_rgb(tmp_path)
    want = ImageFolder(rgb, resolution).batch(range(6))
    assert want.shape == (6, 3, resolution or 6, resolution or 10)
    for path in (mixed, zip_folder(mixed, tmp_path / "mixed.zip")):
        f = ImageFolder(path, resolution)
        assert torch.equal(f.batch(range(6)), want) and f.channels == 3


@pytest.mark.parametrize("resolution", [None, 4])
def test_an_all_grey_folder_stays_grey_with_or_without_resolution(tmp_path, resolution):
    _, rgb, arrays = grey_and_rgb(tmp_path)
    grey = {name: a for name, a in arrays.items() if a.ndim == 2}
    for name, a in grey.items():
        write_png(str(tmp_path / "grey" / name), a)
    images = ImageFolder(str(tmp_path / "grey"), resolution).batch(range(len(grey)))
    assert images.shape == (len(grey), 1, resolution or 6, resolution or 10)
    # the same pixels as the RGB version's, one channel: the same crop and LANCZOS on each channel
    as_rgb = ImageFolder(rgb, resolution)
    assert torch.equal(images.expand(-1, 3, -1, -1), as_rgb.batch([as_rgb.names.index(n) for n in sorted(grey)]))


def rgba(array, alpha):
    return np.dstack([array, np.full(array.shape[:2], alpha, np.uint8)])


def palette_png(path, transparent_index):
    """A palette PNG of indices 0-2 (red, green, grey) whose tRNS makes palette entry `transparent_index` clear."""
    image = PIL.Image.fromarray(np.array([[0, 1, 2, 2]] * 4, np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 90, 90, 90, 0, 0, 0])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, transparency=transparent_index)


def test_an_alpha_channel_255_everywhere_is_dropped_and_its_files_listed(tmp_path):
    rng = np.random.default_rng(3)
    colour, grey = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), rng.integers(0, 256, (4, 4), dtype=np.uint8)
    write_png(str(tmp_path / "colour" / "a.png"), colour)
    PIL.Image.fromarray(rgba(colour, 255), "RGBA").save(tmp_path / "colour" / "b.png")
    palette_png(str(tmp_path / "colour" / "c.png"), transparent_index=3)      # no pixel uses entry 3
    f = ImageFolder(str(tmp_path / "colour"))
    assert np.array_equal(f.read(1), f.read(0))
    assert f.read(2)[:, 0].T.tolist() == [[255, 0, 0], [0, 255, 0], [90, 90, 90], [90, 90, 90]]
    assert f.opaque_alpha == ["b.png", "c.png"] and f.channels == 3
    write_png(str(tmp_path / "grey" / "a.png"), grey)
    PIL.Image.fromarray(np.dstack([grey, np.full((4, 4), 255, np.uint8)]), "LA").save(tmp_path / "grey" / "b.png")
    g = ImageFolder(str(tmp_path / "grey"), resolution=2)                   # greyscale + alpha stays greyscale
    assert g.batch([0, 1]).shape == (2, 1, 2, 2) and np.array_equal(g.read(1), g.read(0))
    assert g.opaque_alpha == ["b.png"]
    assert ImageFolder(str(tmp_path / "grey")).opaque_alpha == ["b.png"]   # with or without resolution


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "L"])
def test_transparency_is_refused_up_front_naming_the_first_transparent_file(tmp_path, kind):
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    write_png(str(tmp_path / "a.png"), np.zeros((4, 4, 3), np.uint8))
    PIL.Image.fromarray(rgba(np.zeros((4, 4, 3), np.uint8), 255), "RGBA").save(tmp_path / "b.png")   # opaque
    if kind == "RGBA":                                                      # one pixel not quite opaque
        array = rgba(np.zeros((4, 4, 3), np.uint8), 255)
        array[3, 3, 3] = 254
        PIL.Image.fromarray(array, "RGBA").save(tmp_path / "c.png")
    elif kind == "LA":
        PIL.Image.fromarray(np.dstack([grey, grey]), "LA").save(tmp_path / "c.png")
    elif kind == "P":
        palette_png(str(tmp_path / "c.png"), transparent_index=1)           # green pixels are clear
    else:
        PIL.Image.fromarray(grey).save(tmp_path / "c.png", transparency=5)  # grey level 5 is clear
    PIL.Image.fromarray(rgba(np.zeros((4, 4, 3), np.uint8), 0), "RGBA").save(tmp_path / "d.png")
    with pytest.raises(ValueError, match=r"'c.png' in .* is transparent \(alpha < 255\); composite it on a "
                                         r"background of your choice first"):
        ImageFolder(str(tmp_path))
    (tmp_path / "d.png").unlink()                                          # c.png's clear pixels alone still refuse
    with pytest.raises(ValueError, match=r"'c.png' in .* is transparent"):
        ImageFolder(str(tmp_path))


def test_headers_are_read_up_front_and_pixels_when_asked(tmp_path):
    # A file whose header is sound but whose pixels are not: the folder opens (sizes and channels come from the
    # headers), and reading that image names it.
    write_png(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    write_png(str(tmp_path / "b.png"), np.full((8, 8, 3), 7, np.uint8))
    data = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[:data.index(b"IDAT") + 8] + b"\0" * 8)
    f = ImageFolder(str(tmp_path))
    assert len(f) == 2 and f.read(0).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="cannot read image 'b.png'"):
        f.read(1)


def test_generates_grid_png_is_not_one_of_the_images(tmp_path):
    # `generate` writes grid.png (larger than its images) beside generation.json: every reader leaves it out.
    for i in range(2):
        write_png(str(tmp_path / "gen" / f"{i:06d}.png"), np.full((8, 8, 3), i, np.uint8))
    write_png(str(tmp_path / "gen" / "grid.png"), np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "gen" / "generation.json").write_text("[]")
    for path in (str(tmp_path / "gen"), zip_folder(tmp_path / "gen", tmp_path / "gen.zip")):
        assert ImageFolder(path).names == ["000000.png", "000001.png"]
    os.remove(tmp_path / "gen" / "generation.json")       # without it, a grid.png is a user's image like any other
    with pytest.raises(ValueError, match="'grid.png' is 20x20 but '000000.png' is 8x8"):
        ImageFolder(str(tmp_path / "gen"))
