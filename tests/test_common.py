"""common.py's small pieces that every image passes through."""
import torch

import common


def test_to_uint8_quantizes_as_the_official_generate():
    """float [-1, 1] -> uint8 as the official generate.py writes PNGs: x * 127.5 + 128, clipped to [0, 255],
    then truncated (so 0 -> 128 and 1 -> 255; half a grey level of bias anywhere changes a value here)."""
    x = torch.tensor([-1.5, -1.0, -0.999, -0.5, -0.004, 0.0, 0.004, 0.5, 0.996, 1.0, 1.5], dtype=torch.float32)
    expected = [0, 0, 0, 64, 127, 128, 128, 191, 254, 255, 255]
    got = common.to_uint8(x.view(1, 1, 1, -1).expand(1, 3, 1, -1))
    assert got.dtype == torch.uint8 and got.shape == (1, 1, len(x), 3)       # NCHW -> NHWC
    assert got[0, 0, :, 0].tolist() == expected and (got[..., 0] == got[..., 2]).all()
