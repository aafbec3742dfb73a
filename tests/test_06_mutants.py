"""06_unet: checks added in the mutation round (docs/TESTING.md) for bugs the other tests let through.

The reference outputs load official weights, so they cannot see the initialization. Here every layer's
initial weights are checked against the scheme SongUNet's and DhariwalUNet's docstrings document (the
official one): DDPM++ / NCSN++ Xavier-uniform, the last layer of each block and the output conv at 1e-5
of it, attention qkv at sqrt(0.2) of it, zero biases; ADM PyTorch-default-like U(+-1/sqrt(fan_in)),
exactly zero last layers, an N(0, 1) class embedding.
"""
import math

import pytest
import torch


@pytest.fixture(scope="module")
def ch06(load):
    return load("06_unet")


def layers(ch06, model):
    """(name, layer, fan_in, fan_out) of every Linear / Conv2d with weights."""
    for name, layer in model.named_modules():
        if isinstance(layer, ch06.Linear):
            yield name, layer, layer.in_features, layer.out_features
        elif isinstance(layer, ch06.Conv2d) and layer.weight is not None:
            k = layer.weight.shape[-1]
            yield name, layer, layer.in_channels * k * k, layer.out_channels * k * k


def assert_uniform(name, w, bound):
    """Entries of a U(-bound, bound) draw: none beyond it, and (>= 256 entries) the largest close to it."""
    largest = float(w.detach().abs().max())
    assert largest <= bound * (1 + 1e-6), f"{name}: |w| up to {largest:.3g}, beyond the bound {bound:.3g}"
    if w.numel() >= 256:
        assert largest > 0.9 * bound, f"{name}: |w| only up to {largest:.3g}, the bound is {bound:.3g}"


SONG = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=4, augment_dim=9, model_channels=32,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


NCSNPP = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])


@pytest.mark.parametrize("flavour", [dict(), NCSNPP], ids=["ddpmpp", "ncsnpp"])
def test_song_unet_initialization(ch06, flavour):
    torch.manual_seed(0)
    model = ch06.SongUNet(**SONG, **flavour)
    for name, layer, fan_in, fan_out in layers(ch06, model):
        xavier = math.sqrt(6 / (fan_in + fan_out))
        if name.endswith((".conv1", ".proj", "aux_conv")):
            scale = 1e-5                    # each block starts close to its skip connection
        elif name.endswith(".qkv"):
            scale = math.sqrt(0.2)
        else:
            scale = 1
        assert_uniform(name, layer.weight, scale * xavier)
        assert layer.bias is None or not layer.bias.any(), f"{name}: bias not zero"


def test_adm_initialization(ch06):
    torch.manual_seed(0)
    model = ch06.DhariwalUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=9,
                              model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    for name, layer, fan_in, fan_out in layers(ch06, model):
        if name.endswith((".conv1", ".proj", "out_conv", "map_augment")):
            assert not layer.weight.any() and (layer.bias is None or not layer.bias.any()), f"{name}: not zero"
        elif name == "map_label":           # like an nn.Embedding table: N(0, 1)
            w = layer.weight.detach()
            assert abs(float(w.std()) - 1) < 5 / math.sqrt(2 * w.numel()) and layer.bias is None, name
        else:
            assert_uniform(name, layer.weight, 1 / math.sqrt(fan_in))
            assert_uniform(name + ".bias", layer.bias, 1 / math.sqrt(fan_in))
