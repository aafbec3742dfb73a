"""A stand-in for the Inception detector, for GPU checks on machines that cannot download it:
`python tools/standin_detector.py det.pt` writes a TorchScript module with the interface of NVIDIA's
detector (uint8 NCHW images, `return_features`, 2048 features) that 08 loads with `--detector det.pt`.
Its features are a fixed random 3x3 convolution, ReLU and 4x4 average pooling: it checks the FID
pipeline and its device arithmetic, not Inception."""
import sys

import torch


class Features(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(128, 3, 3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, return_features: bool = False):
        y = torch.nn.functional.conv2d(x.float() / 127.5 - 1, self.w, padding=1).relu()
        return torch.nn.functional.adaptive_avg_pool2d(y, 4).flatten(1)


def save(path):
    torch.jit.save(torch.jit.script(Features()), path)


if __name__ == "__main__":
    save(sys.argv[1])
