"""08's Inception path against a hand-written reference of the TF graph `inception-2015-12-05`.

FID is defined by that graph: images in [0, 255] are resized to 299x299 by TF 1.x's
resize_bilinear (align_corners=False, no half-pixel centres: output pixel j samples input
coordinate j * in / 299, clamped to the last pixel), mapped by (x - 128) / 128, and pushed
through Inception-v3, whose 3x3 average pools divide by the number of pixels inside the image
and whose last block max-pools. The reference below writes each of these steps out by hand
(gather-and-lerp resize, pools as sums of shifted copies), independent of 08's grid_sample
and F.avg_pool2d, and runs on seeded random weights (the real ones are a download away).
"""
import math

import pytest
import torch
import torch.nn.functional as F

SIZE = 299


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------
# The reference.

def reference_resize(images):
    """TF 1.x resize_bilinear to 299x299 of uint8 [N, C, H, W], in float64."""
    x = images.double()

    def taps(size):
        src = torch.arange(SIZE, dtype=torch.float64) * size / SIZE    # j * in / out
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=size - 1)
        return lo, hi, src - lo

    r0, r1, fy = taps(x.shape[2])
    c0, c1, fx = taps(x.shape[3])
    rows = x[:, :, r0] * (1 - fy)[:, None] + x[:, :, r1] * fy[:, None]
    return rows[..., c0] * (1 - fx) + rows[..., c1] * fx


def reference_preprocess(images):
    return (reference_resize(images) - 128) / 128


def windows(x, fill):
    """The 9 shifted copies of x that a 3x3, stride-1, 'SAME' window sees at each pixel."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    return [padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]


def avg_pool_inside(x):
    """TF's 3x3 'SAME' average pool: the mean over the window's pixels that lie inside the image."""
    inside = sum(windows(torch.ones_like(x[:1, :1]), 0.0))       # 9 inside, 6 on edges, 4 in corners
    return sum(windows(x, 0.0)) / inside


def max_pool_same(x):
    return torch.stack(windows(x, -math.inf)).amax(0)


def block_a(m, x):
    return torch.cat([m.branch1x1(x), m.branch5x5_2(m.branch5x5_1(x)),
                      m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x))), m.branch_pool(avg_pool_inside(x))], 1)


def block_c(m, x):
    b7 = m.branch7x7_3(m.branch7x7_2(m.branch7x7_1(x)))
    b7d = m.branch7x7dbl_5(m.branch7x7dbl_4(m.branch7x7dbl_3(m.branch7x7dbl_2(m.branch7x7dbl_1(x)))))
    return torch.cat([m.branch1x1(x), b7, b7d, m.branch_pool(avg_pool_inside(x))], 1)


def block_e(pool):
    def block(m, x):
        b3 = m.branch3x3_1(x)
        b3d = m.branch3x3dbl_2(m.branch3x3dbl_1(x))
        return torch.cat([m.branch1x1(x), m.branch3x3_2a(b3), m.branch3x3_2b(b3),
                          m.branch3x3dbl_3a(b3d), m.branch3x3dbl_3b(b3d), m.branch_pool(pool(x))], 1)
    return block


def stem(net, x):
    """Convolutions and VALID 3x3/2 max pools up to 35x35: the same in TF and torchvision."""
    x = net.Conv2d_2b_3x3(net.Conv2d_2a_3x3(net.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, 2)
    return F.max_pool2d(net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x)), 3, 2)


# The blocks where the TF graph differs from torchvision's (pooling), with their reference.
# Mixed_6a and Mixed_7a (grid reductions: VALID max pools) agree with torchvision and are reused.
TF_BLOCKS = {"Mixed_5b": block_a, "Mixed_5c": block_a, "Mixed_5d": block_a,
             "Mixed_6b": block_c, "Mixed_6c": block_c, "Mixed_6d": block_c, "Mixed_6e": block_c,
             "Mixed_7b": block_e(avg_pool_inside), "Mixed_7c": block_e(max_pool_same)}
ORDER = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         "Mixed_7a", "Mixed_7b", "Mixed_7c"]


def reference_features(net, images):
    x = stem(net, reference_preprocess(images).float())
    for name in ORDER:
        block = getattr(net, name)
        x = TF_BLOCKS[name](block, x) if name in TF_BLOCKS else block(x)
    return x.mean(dim=[2, 3])                                         # pool_3: the 2048-d features


# ----------------------------------------------------------------------------
# Seeded random weights that keep activations O(1) through all 94 layers, so that a
# difference anywhere shows at the output.

def seeded_state_dict(fid, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = fid.tf_inception_v3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
            elif isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return net.state_dict()


@pytest.fixture(scope="module")
def detector(fid):
    return fid.TorchvisionDetector(seeded_state_dict(fid))


def random_images(shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# Tests.

@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 1, 17, 23), (1, 3, 320, 300)])
def test_preprocessing_is_tf_bilinear_resize_then_minus_128_over_128(fid, shape):
    images = random_images(shape, seed=sum(shape))
    got = fid.tf_preprocess(images)
    assert got.shape == (shape[0], shape[1], SIZE, SIZE) and got.dtype == torch.float32
    # float32 sample coordinates are off by up to ~2e-5 px for 300-px inputs: < 0.01 grey levels here,
    # while a half-pixel or align_corners change moves values by tens of grey levels.
    torch.testing.assert_close(got.double(), reference_preprocess(images), rtol=0, atol=2e-4,
                               msg=lambda m: f"08's resize to 299 / scaling differs from TF's: {m}")
    assert got.min() >= -1 and got.max() <= 127 / 128


def test_resize_samples_at_j_times_in_over_out(fid):
    # Pixel j of the output of a horizontal ramp 0, 1, ..., 31 sits at input coordinate j * 32 / 299
    # (clamped to 31): exact, no half-pixel shift.
    ramp = torch.arange(32, dtype=torch.uint8).repeat(1, 1, 4, 1)
    row = fid.tf_preprocess(ramp)[0, 0, 0].double() * 128 + 128
    want = (torch.arange(SIZE, dtype=torch.float64) * 32 / SIZE).clamp(max=31)
    torch.testing.assert_close(row, want, rtol=0, atol=1e-4)


def nvidia_preprocess(images):
    """NVIDIA's TorchScript detector's own first ops (the formula of its published code): an affine grid over
    299x299 shifted by 1/in - 1/299 (its half-pixel offset), bilinear grid_sample with border padding, then
    (x - 128) / 128."""
    n, c, h, w = images.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / w - 1 / SIZE
    theta[1, 2] += 1 / h - 1 / SIZE
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, SIZE, SIZE], align_corners=False)
    x = F.grid_sample(images.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 3, 17, 23)])
def test_pytorch_fid_detector_resizes_and_scales_as_nvidias(fid, detector, shape):
    """--detector pytorch-fid feeds its network exactly what NVIDIA's detector computes from the uint8 images
    (README, 'Which detector'), not the pytorch-fid package's F.interpolate resize."""
    seen = []
    hook = detector.net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    images = random_images(shape, seed=5)
    try:
        with torch.no_grad():
            detector(images)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0].double(), nvidia_preprocess(images), rtol=0, atol=2e-4,
                               msg=lambda m: f"pytorch-fid's input differs from NVIDIA's preprocessing: {m}")
    interpolated = F.interpolate(images.double(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert ((interpolated - 128) / 128 - seen[0].double()).abs().max() > 0.05   # the package's resize differs


def test_pool_branches_equal_the_tf_graph_block_by_block(fid, detector):
    net = detector.net
    seen = {}
    hooks = [getattr(net, name).register_forward_hook(
        lambda module, inputs, output, name=name: seen.__setitem__(name, (inputs[0], output))) for name in TF_BLOCKS]
    try:
        with torch.no_grad():
            detector(random_images((1, 3, 32, 32), seed=1))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for name, block in TF_BLOCKS.items():
            x, got = seen[name]
            assert got.abs().mean() > 0.1, f"{name}: activations vanished; the test would see nothing"
            torch.testing.assert_close(got, block(getattr(net, name), x), rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name: f"{name} pools differently from the TF graph: {m}")


def test_features_equal_the_reference_end_to_end(fid, detector):
    images = random_images((1, 3, 32, 32), seed=2)
    with torch.no_grad():
        got = fid.features_of(detector, images)
        want = reference_features(detector.net, images)
        grey = random_images((1, 1, 16, 16), seed=3)            # greyscale is fed as RGB
        got_grey, want_grey = fid.features_of(detector, grey), reference_features(detector.net, grey.repeat(1, 3, 1, 1))
    assert got.shape == (1, 2048)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().mean().item(),
                               msg=lambda m: f"2048-d pool features differ from the TF graph's: {m}")
    torch.testing.assert_close(got_grey, want_grey, rtol=1e-4, atol=1e-4 * want_grey.abs().mean().item())
