"""The non-leaking augment pipe (07's AugmentPipe, which 05's losses apply): identity at p = 0, labels that say
what was done, official outputs."""
import os

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


@pytest.fixture(scope="module")
def P(load):
    return load("07_train_cifar10")


def pipe(P, seed=0, p=1.0, **enable):
    return P.AugmentPipe(p, torch.Generator().manual_seed(seed), **dict(OFF, **enable))


def blob(n, size=32, centre=(0.0, 0.0), width=2.0):
    """n copies of a round Gaussian blob (3 channels) centred at `centre` (pixels from the image centre)."""
    c = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    image = torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * width ** 2))
    return image.expand(n, 3, size, size).clone()


def moments(images, radius=12):
    """Per image: centroid [N, 2] (x right, y down, from the centre) and covariance [N, 2, 2], measured
    within `radius` of the centre (reflect padding may bring in mirrored copies further out)."""
    n, _, h, w = images.shape
    y, x = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    m = images.sum(1).clamp(min=0) * (x ** 2 + y ** 2 <= radius ** 2)
    m = m / m.sum((1, 2), keepdim=True)
    mean = torch.stack([(m * x).sum((1, 2)), (m * y).sum((1, 2))], 1)
    dx, dy = x - mean[:, 0, None, None], y - mean[:, 1, None, None]
    cov = torch.stack([(m * dx * dx).sum((1, 2)), (m * dx * dy).sum((1, 2)),
                       (m * dx * dy).sum((1, 2)), (m * dy * dy).sum((1, 2))], 1).reshape(n, 2, 2)
    return mean, cov


def test_p0_is_the_identity_with_zero_labels(P):
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    y, labels = P.AugmentPipe(0.0, torch.Generator().manual_seed(0))(x)   # the paper's multipliers, p = 0
    assert torch.equal(y, x)
    assert labels.shape == (5, 9) and torch.count_nonzero(labels) == 0


@pytest.mark.parametrize("p,seed", [(0.5, 1), (1.0, 2)])
def test_matches_the_official_augment_pipe(P, p, seed):
    """tests/data/07_augment_official.npz: NVlabs/edm training/augment.py, AugmentPipe(p, xflip=1e8, yflip=1,
    scale=1, rotate_frac=1, aniso=1, translate_frac=1) after torch.manual_seed(seed), CPU float32."""
    ref = np.load(os.path.join(HERE, "data", "07_augment_official.npz"))
    y, labels = P.AugmentPipe(p, torch.Generator().manual_seed(seed))(torch.from_numpy(ref["images"]))
    np.testing.assert_allclose(labels.numpy(), ref[f"p{p}_seed{seed}_labels"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y.numpy(), ref[f"p{p}_seed{seed}_images"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name,dim,column", [("xflip", 3, 0), ("yflip", 2, 1)])
def test_flip_label_is_one_exactly_when_the_image_is_mirrored(P, name, dim, column):
    x = torch.rand(64, 3, 8, 8)
    y, labels = pipe(P, **{name: 1})(x)
    flipped = labels[:, column] == 1
    assert 10 < flipped.sum() < 54                                   # a fair coin per image
    assert torch.equal(y[flipped], x[flipped].flip(dim))
    assert torch.equal(y[~flipped], x[~flipped])
    assert torch.count_nonzero(labels[:, [c for c in range(9) if c != column]]) == 0


def test_translation_label_is_the_shift_in_units_of_an_eighth_of_the_image(P):
    x = blob(32)
    y, labels = pipe(P, seed=3, translate_frac=1)(x)
    shift, _ = moments(y, radius=100)
    expected = labels[:, 7:9] * 32 * 0.125                          # std 0.125 x image size
    assert labels[:, 7:9].abs().max() > 0.5
    torch.testing.assert_close(shift, expected, atol=0.05, rtol=0.01)


def test_scale_label_is_log2_of_the_magnification_over_its_std(P):
    x = blob(32)
    y, labels = pipe(P, seed=4, scale=1)(x)
    _, cov = moments(y)
    _, cov0 = moments(x)
    s = 2 ** (0.2 * labels[:, 2])                                   # content magnified by s
    torch.testing.assert_close(cov[:, 0, 0] / cov0[:, 0, 0], s ** 2, rtol=0.02, atol=0)
    torch.testing.assert_close(cov[:, 1, 1] / cov0[:, 1, 1], s ** 2, rtol=0.02, atol=0)


def test_rotation_labels_are_cos_minus_one_and_sin_of_the_angle(P):
    q = torch.tensor([5.0, 0.0])
    x = blob(64, centre=q.tolist(), width=1.5)
    y, labels = pipe(P, seed=5, rotate_frac=1)(x)
    c, s = labels[:, 3] + 1, labels[:, 4]
    torch.testing.assert_close(c ** 2 + s ** 2, torch.ones(64))
    assert (s.abs() > 0.5).sum() > 10
    # out(p) = in(R(w) p): a blob at q lands at R(-w) (q - c0) + c0 (x right, y down), rotating about
    # a centre c0 that the official coordinate conventions put a few hundredths of a pixel off the middle.
    R = torch.stack([c, s, -s, c], 1).reshape(-1, 2, 2)              # R(-w)
    mean, _ = moments(y)
    lhs = (torch.eye(2) - R).reshape(-1, 2)
    rhs = (mean - (R @ q)).reshape(-1, 1)
    c0 = torch.linalg.lstsq(lhs, rhs).solution                       # 2 unknowns, 128 equations
    assert c0.abs().max() < 0.1
    torch.testing.assert_close(lhs @ c0, rhs, atol=2e-3, rtol=0)


def test_anisotropic_labels_give_the_stretch_and_its_axis(P):
    x = blob(32)
    y, labels = pipe(P, seed=6, aniso=1)(x)
    _, cov = moments(y)
    _, cov0 = moments(x)
    a, b = labels[:, 5], labels[:, 6]                                # w cos r, w sin r
    w, r = torch.hypot(a, b), torch.atan2(b, a)
    # out(p) = in(R(-r) S(1/s, s) R(r) p) with s = 2^(0.2 w): content mapped by A = R(-r) S(s, 1/s) R(r),
    # covariance by A cov A^T. The labels cannot tell (w, r) from (-w, r + pi) -- the same axis, the
    # reciprocal stretch -- a property of the official labels, so either reading must fit.
    R = lambda t: torch.stack([t.cos(), -t.sin(), t.sin(), t.cos()], 1).reshape(-1, 2, 2)
    errors = []
    for sign in (1, -1):
        s = 2 ** (0.2 * sign * w)
        A = R(-r) @ torch.diag_embed(torch.stack([s, 1 / s], 1)) @ R(r)
        errors.append((cov - A @ cov0 @ A.transpose(1, 2)).abs().amax((1, 2)) / cov0[:, 0, 0])
    assert w.max() > 1.0
    assert torch.minimum(*errors).max() < 0.02
    assert (torch.maximum(*errors)[w > 0.5] > 0.2).all()            # and the wrong reading would not fit


def test_labels_are_zero_for_transforms_that_did_not_fire(P):
    x = blob(200)
    _, labels = P.AugmentPipe(0.12, torch.Generator().manual_seed(7))(x)    # the paper's CIFAR-10 p
    fired = (labels[:, 2:] != 0).float().mean(0)                     # scale, rot(2), aniso(2), translate(2)
    assert all(0.04 < f < 0.22 for f in fired[[0, 1, 5]].tolist()), fired
    assert 0.3 < labels[:, 0].float().mean() < 0.7                   # xflip=1e8: always a coin flip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_augmentation_under_autocast_is_the_float32_augmentation(P, dtype):
    # 07 runs the loss, and so the augment pipe, under autocast; the geometry must stay float32 there
    # (it used to fail on its first resampled image: "Index put requires the source and destination dtypes match").
    images = torch.randn(8, 3, 16, 16)
    expected = pipe(P, seed=3, p=0.8, xflip=1, scale=1, rotate_frac=1, translate_frac=1)(images)
    with torch.autocast("cpu", dtype=dtype):
        got = pipe(P, seed=3, p=0.8, xflip=1, scale=1, rotate_frac=1, translate_frac=1)(images)
    assert got[0].dtype == torch.float32 and (got[1][:, 2:] != 0).any(1).sum() >= 4
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
