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

    mixed = tmp_path / "mixed"
    write_png(str(mixed / "a.png"), np.zeros((8, 8, 3), np.uint8))
    write_png(str(mixed / "b.png"), np.zeros((16, 8, 3), np.uint8))
    write_png(str(mixed / "c.png"), np.zeros((8, 8), np.uint8))
    f = ImageFolder(str(mixed))                         # lazy: the first image sets the shape
    with pytest.raises(ValueError, match=r"'b.png' is 8x16 with 3 channel\(s\) but 'a.png' is 8x8 with 3"):
        f.read(1)
    with pytest.raises(ValueError, match=r"'c.png' is 8x8 with 1 channel\(s\) but 'a.png'"):
        f.batch([0, 2])

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
