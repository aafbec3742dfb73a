"""06 -- The networks: DDPM++, NCSN++ and ADM U-Nets, and loading the official checkpoints.

App. F.4 and Table 7 of the paper. Chapter 05 wrapped a raw network F in the preconditioning of Eq. 7;
this chapter is F itself, the U-Nets the paper trains: `SongUNet` (DDPM++ and NCSN++) and `DhariwalUNet`
(ADM), both built from one residual `UNetBlock`. Their state dicts are key for key and shape for shape
those of the official NVlabs/edm checkpoints, and the same weights give the same numbers. `PAPER_CONFIGS`
holds the paper's three networks as the official train.py builds them; `from_official_config` wraps one
in 05's preconditioner. `load_network` opens official edm-*.pkl / network-snapshot-*.pkl files safely
(their pickles carry Python source, read here as data and never run) and this project's own snapshots,
which `save_network` writes.

Run `python 06_unet.py` (about 15 s on 2 CPU cores): for each paper network it prints the parameter count,
the GFLOPs of one forward pass per image and the forward / forward+backward throughput (on CPU only the
CIFAR-10 nets unless --time says otherwise), and plots where the FLOPs go along the resolution ladder
(flops_per_block.png). Options: --batch, --iters, --precision (autocast bf16/fp16), --compile,
--channels-last; --load PATH|URL inspects a checkpoint instead.
"""

import collections
import copy
import inspect
import io
import math
import os
import pickle
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import common

ch05 = common.load("05_preconditioning")   # the wrappers of Eq. 7 (VPPrecond, ..., EDMPrecond) around F


# ============================================================================
# The networks, top down: SongUNet and DhariwalUNet, the UNetBlock they share, the layers.

class SongUNet(torch.nn.Module):
    """DDPM++ (VP) and NCSN++ (VE) of Song et al. 2021, "Score-Based Generative Modeling through SDEs".

    The image goes down a ladder of resolutions and back up, e.g. 32 -> 16 -> 8 -> 16 -> 32 for CIFAR-10:
    rung `level` works at `img_resolution >> level` pixels with `model_channels * channel_mult[level]`
    channels in `num_blocks` UNetBlocks, with self-attention at `attn_resolutions`. The encoder pushes
    every output onto a stack; each decoder block pops one and concatenates it to its input, which is why
    decoder blocks have more input than output channels and why fine detail survives the trip through 8x8.
    Keys spell the ladder out: `enc.16x16_block1`, `dec.8x8_in0`, `dec.32x32_up`, ...

    DDPM++ (embedding_type='positional', encoder_type='standard', resample_filter=[1, 1]): the embedding is
    *added* to the features before the second GroupNorm; residual sums are scaled by sqrt(1/2); one
    attention head; Xavier-uniform init with each block's last layer near zero (1e-5), attention qkv at
    sqrt(0.2). NCSN++ (embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
    resample_filter=[1, 3, 3, 1]): the same blocks plus a second encoder path that downsamples the input
    image directly (fused conv + [1, 3, 3, 1] blur) and is averaged into each new rung.
    """

    def __init__(self,
                 img_resolution,                  # image resolution at input and output
                 in_channels,                     # colour channels at input
                 out_channels,                    # colour channels at output
                 label_dim=0,                     # number of classes, 0 = unconditional
                 augment_dim=0,                   # augmentation label size, 0 = no augmentation conditioning
                 model_channels=128,              # base channel count
                 channel_mult=(1, 2, 2, 2),       # channels per rung of the ladder, in units of model_channels
                 channel_mult_emb=4,              # embedding size, in units of model_channels
                 num_blocks=4,                    # residual blocks per rung
                 attn_resolutions=(16,),          # resolutions with self-attention
                 dropout=0.10,                    # dropout inside the blocks
                 label_dropout=0,                 # probability of dropping the class (classifier-free guidance)
                 embedding_type="positional",     # noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++)
                 channel_mult_noise=1,            # noise embedding size in units of model_channels: 1 DDPM++, 2 NCSN++
                 encoder_type="standard",         # 'standard' (DDPM++), 'residual' (NCSN++) or 'skip'
                 decoder_type="standard",         # 'standard' (both) or 'skip'
                 resample_filter=(1, 1),          # [1,1] (DDPM++) or [1,3,3,1] (NCSN++)
                 ):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', not {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', not {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', not {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # Embedding: c_noise (05, Table 1) as sines and cosines (positional: Transformer-style frequencies;
        # fourier: random ones, scale 16), then a two-layer MLP. One-hot classes and the 9 augmentation labels
        # of App. F.2 (which flip, scaling, rotation, ... was applied, so that sampling can ask for none) are
        # mapped by linear layers and added; every UNetBlock injects the result between its two convolutions.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: down the ladder. `caux` = channels of the extra image path (skip / residual encoders).
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":  # downsampled input image, projected and added
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":  # a strided conv path from the previous rung, averaged in
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block)
        skips = [layer.out_channels for name, layer in self.enc.items() if not role(name).startswith("aux")]

        # Decoder: up the ladder, each block consuming one skip. Attention only in a rung's last block.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block)
            # Output head: at full resolution only ('standard'), or at every rung, upsampled and summed ('skip').
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Embedding. Song et al. order the features [sin, cos]; the embedding layers give [cos, sin].
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        # Encoder.
        skips = []
        aux = x
        for name, layer in self.enc.items():
            kind = role(name)
            if kind == "aux_down":
                aux = layer(aux)
            elif kind == "aux_skip":
                x = skips[-1] = x + layer(aux)
            elif kind == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)

        # Decoder. `out` accumulates the output head(s); `h` is the normalized input of the next head conv.
        out = h = None
        for name, layer in self.dec.items():
            kind = role(name)
            if kind == "aux_up":
                out = layer(out)
            elif kind == "aux_norm":
                h = layer(x)
            elif kind == "aux_conv":
                h = layer(F.silu(h))
                out = h if out is None else h + out
            else:
                if kind.startswith("block"):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out


class DhariwalUNet(torch.nn.Module):
    """ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis").

    SongUNet's ladder, but the embedding *modulates* the normalized features, x * (1 + scale) + shift
    ("adaptive group norm"); 64 channels per attention head, attention at 32, 16 and 8; PyTorch-default-like
    init and exactly-zero last layers; the class embedding is added after the MLP."""

    def __init__(self,
                 img_resolution,                  # image resolution at input and output
                 in_channels,                     # colour channels at input
                 out_channels,                    # colour channels at output
                 label_dim=0,                     # number of classes, 0 = unconditional
                 augment_dim=0,                   # augmentation label size, 0 = no augmentation conditioning
                 model_channels=192,              # base channel count
                 channel_mult=(1, 2, 3, 4),       # channels per rung of the ladder, in units of model_channels
                 channel_mult_emb=4,              # embedding size, in units of model_channels
                 num_blocks=3,                    # residual blocks per rung
                 attn_resolutions=(32, 16, 8),    # resolutions with self-attention
                 dropout=0.10,                    # dropout inside the blocks
                 label_dropout=0,                 # probability of dropping the class (classifier-free guidance)
                 ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        # kaiming_uniform * sqrt(1/3) = U(+-1/sqrt(fan_in)): PyTorch's default Conv2d/Linear init.
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Embedding. The class embedding has N(0, 1) weights, like an nn.Embedding table.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block)
        skips = [layer.out_channels for layer in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for name, layer in self.dec.items():
            if role(name).startswith("block"):
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def drop_labels(class_labels, p, training):
    """Classifier-free guidance training: zero each sample's class vector with probability p."""
    if not (training and p):
        return class_labels
    keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= p
    return class_labels * keep.to(class_labels.dtype)


def role(name):
    """'16x16_block1' -> 'block1', '32x32_aux_down' -> 'aux_down': what a ladder entry does."""
    return name.split("_", 1)[1]


class UNetBlock(torch.nn.Module):
    """The residual block all three architectures share, optionally resampling and with self-attention.

        h = conv0(silu(norm0(x)))                       (with up/downsampling if requested)
        h = silu(norm1(h + affine(emb)))                 DDPM++ / NCSN++ (adaptive_scale=False)
        h = silu(norm1(h) * (1 + scale) + shift)         ADM: (scale, shift) = affine(emb)
        x = (conv1(dropout(h)) + skip(x)) * skip_scale
        x = (proj(attention(norm2(x))) + x) * skip_scale  (if attention)
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True,
                 init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = init or {}
        init_zero = init_zero or dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = (num_heads or out_channels // channels_per_head) if attention else 0
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)  # ~0 at init: block starts as identity

        # The shortcut needs a layer when channels or resolution change: a 1x1 conv, or (ADM, same
        # channels) just the resampling filter.
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h.add_(params)))
        # The sums go in place (add_, mul_ on a conv's fresh output, which no backward needs): each
        # out-of-place one would write a new full-size tensor (issue 29's profile).
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = h.add_(self.skip(x) if self.skip is not None else x).mul_(self.skip_scale)
        if self.num_heads:
            x = self.proj(self.attention(self.norm2(x))).add_(x).mul_(self.skip_scale)
        return x

    def attention(self, x):
        """Multi-head self-attention over the H*W positions.

        The official layout interleaves q, k, v *inside* each head: the 3C output channels of the
        qkv conv are [head][channel within head][q|k|v]. Reading them in that order keeps
        checkpoints interchangeable. softmax(q.k / sqrt(d)) v goes through PyTorch's fused
        scaled_dot_product_attention (flash / memory-efficient kernels on GPU), except on the CPU while
        the attention matrix is no larger than q (positions <= channels per head, e.g. DDPM++'s 16x16
        with 256 channels): there the explicit product, written as the official code writes it, is faster
        forward and backward, while the fused kernel is twice as fast at ADM's 32x32 (issue 29)."""
        n, c, height, width = x.shape
        d, positions = c // self.num_heads, height * width
        qkv = self.qkv(x).reshape(n, self.num_heads, d, 3, positions)
        if x.device.type == "cpu" and positions <= d:
            q, k, v = qkv.flatten(0, 1).unbind(2)                        # each [n * heads, d, positions]
            w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(d)).softmax(dim=2)
            return torch.einsum("nqk,nck->ncq", w, v).reshape(n, c, height, width)
        # -> q, k, v each [n, heads, positions, d], contiguous as the fused kernels want.
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        # contiguous(): with one head the reshape is a view with channels_last strides, and every layer after
        # the first attention would run channels_last on contiguous weights (a weight copy per conv and a
        # slower backward on the CPU: issue 29's profile).
        return a.transpose(2, 3).reshape(n, c, height, width).contiguous()


# ----------------------------------------------------------------------------
# Layers. Weights are stored in float32 and cast to the input's dtype, so the same
# module runs in float32, in float16 (the official use_fp16) or under torch.autocast.

class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)


class Conv2d(torch.nn.Module):
    """kernel x kernel convolution, optionally preceded by 2x up- or downsampling.

    Resampling convolves each channel with the normalized outer product of `resample_filter`
    ([1, 1]: box filter = average pooling / nearest upsampling; [1, 3, 3, 1]: a smoother
    binomial blur) at stride 2: a blur-pool rather than a strided conv, so the downsampled signal is not
    aliased; UNetBlocks move between rungs this way. `kernel=0` gives a pure resampler with no weights.
    `fused_resample` (downsampling only; NCSN++'s residual encoder path) convolves first
    and blurs-and-strides afterwards, with all the padding applied up front.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.outer(f)[None, None] / f.sum().square()  # [1, 1, k, k], sums to 1
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:  # transposed depthwise conv at stride 2; x4 keeps the mean (4x more pixels)
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:  # depthwise blur at stride 2
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:   # in place: x is the conv's own output here
            x = x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))
        return x


class GroupNorm(torch.nn.Module):
    """GroupNorm with 32 groups, but at least 4 channels per group (narrow layers get fewer groups).
    Under autocast, F.group_norm runs in float32 (PyTorch's autocast policy)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(torch.nn.Module):
    """[cos(x w_i), sin(x w_i)] with w_i = (1/max_positions)^(i/(C/2 - endpoint)), i = 0 .. C/2-1 (Transformer-style)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.outer(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """[cos(2 pi x w_i), sin(2 pi x w_i)] with fixed random w_i ~ N(0, scale^2) (random Fourier features)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.outer((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------
# Initialization. All layers draw their weights through one function, in the same
# order as the official code, so that a seed gives the same initial network.

def weight_init(shape, mode, fan_in, fan_out):
    """Uniform or normal init with Xavier (fan_in + fan_out) or Kaiming (fan_in) scaling, unit gain."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


# ----------------------------------------------------------------------------
# Building a preconditioned network from an official configuration.

NETWORKS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
DEFAULT_MODEL_TYPE = {"VPPrecond": "SongUNet", "VEPrecond": "SongUNet", "iDDPMPrecond": "DhariwalUNet", "EDMPrecond": "DhariwalUNet",
                      "FMPrecond": "SongUNet", "ConsistencyPrecond": "SongUNet"}   # (FM: not official; 05's row)
LATER_PRECONDS = {"ConsistencyPrecond": "12_consistency_models"}   # later chapters' wrappers, loaded when a file names one

# The paper's networks (Table 7), as the official train.py configures them for EDM training: 56M parameters
# for CIFAR-10 (128 channels x [2, 2, 2], 4 blocks per rung), 296M for ImageNet-64's ADM (192 x [1, 2, 3, 4]).
PAPER_CONFIGS = {
    "cifar10_ddpmpp_cond": ("EDMPrecond", dict(
        img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13, model_channels=128,
        channel_mult=[2, 2, 2], model_type="SongUNet", embedding_type="positional", encoder_type="standard",
        decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])),
    "cifar10_ncsnpp_uncond": ("EDMPrecond", dict(
        img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, dropout=0.13, model_channels=128,
        channel_mult=[2, 2, 2], model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
        decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "imagenet64_adm_cond": ("EDMPrecond", dict(
        img_resolution=64, img_channels=3, label_dim=1000, dropout=0.1, model_channels=192,
        channel_mult=[1, 2, 3, 4], model_type="DhariwalUNet")),
}


def from_official_config(class_name, kwargs):
    """Chapter 05's `class_name` preconditioner around a SongUNet / DhariwalUNet, from the keyword
    arguments the official EDMPrecond/VPPrecond/... constructor takes (as stored in its checkpoints).

    The returned module remembers its configuration as `net.init_config` (used by save_network)."""
    if class_name not in DEFAULT_MODEL_TYPE:
        raise ValueError(f"unknown preconditioner {class_name!r}; expected one of {', '.join(DEFAULT_MODEL_TYPE)}")
    wrapper = getattr(common.load(LATER_PRECONDS[class_name]) if class_name in LATER_PRECONDS else ch05, class_name)
    network_kwargs = dict(kwargs)
    model_type = network_kwargs.pop("model_type", DEFAULT_MODEL_TYPE[class_name])
    if model_type not in NETWORKS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(NETWORKS)}")
    precond_names = set(inspect.signature(wrapper).parameters) - {"model"}
    precond_kwargs = {name: network_kwargs.pop(name) for name in list(network_kwargs) if name in precond_names}
    img_channels = precond_kwargs["img_channels"]
    model = NETWORKS[model_type](
        img_resolution=precond_kwargs["img_resolution"], in_channels=img_channels,
        out_channels=img_channels * (2 if class_name == "iDDPMPrecond" else 1),  # iDDPM also predicts variances
        label_dim=precond_kwargs.get("label_dim", 0), **network_kwargs)
    net = wrapper(model, **precond_kwargs)
    net.init_config = {"class_name": class_name, "kwargs": copy.deepcopy({**kwargs, "model_type": model_type})}
    return net


# ============================================================================
# Loading and saving. `save_network` writes this project's snapshots (a plain dictionary of
# config + tensors); `load_network` reads them and the official pickles, executing nothing
# from the file.

SNAPSHOT_FORMAT = "edm-tutorial-network-v1"


def save_network(net, path):
    """Write `net` (built by from_official_config; unwrap DDP / torch.compile first) to `path` atomically.

    The file is {"format", "class_name", "kwargs", "state_dict"}, readable with
    torch.load(weights_only=True); an interrupted save never leaves a half-written `path`."""
    config = net.init_config
    data = {"format": SNAPSHOT_FORMAT, "class_name": config["class_name"], "kwargs": config["kwargs"],
            "state_dict": {name: t.detach().cpu() for name, t in net.state_dict().items()}}
    with common.atomic_open(path) as f:
        torch.save(data, f)


def load_network(path):
    """Load an official EDM pickle (edm-*.pkl, network-snapshot-*.pkl) or a save_network snapshot.

    Returns the preconditioned network on the CPU in eval mode. Nothing in the file is executed:
    official pickles go through RestrictedUnpickler, snapshots through torch.load(weights_only=True).
    A missing file raises FileNotFoundError; a corrupt, truncated or refused one ValueError."""
    expected = "pass an official edm-*.pkl or a network-snapshot-*.pt that 07 wrote"
    with open_checkpoint(path) as f:
        magic = f.read(2)
        f.seek(0)
        is_snapshot = magic == b"PK"  # a zip archive, as torch.save writes: our own snapshot
        if not is_snapshot and magic[:1] != b"\x80":   # pickles since protocol 2 start with PROTO (0x80)
            raise ValueError(f"{path}: not a network file ({expected})")
        try:
            data = torch.load(f, map_location="cpu", weights_only=True) if is_snapshot else RestrictedUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except Exception as e:   # torch's and pickle's own messages name their internals, not the problem
            raise ValueError(f"cannot read {path}: truncated or corrupt ({type(e).__name__}); {expected}") from e
    if is_snapshot and isinstance(data, dict) and "cur_nimg" in data:
        raise ValueError(f"{path}: a training state of 07 (for --resume), not a network; pass a "
                         "network-snapshot-*.pt from the same run folder")
    if not isinstance(data, dict) or (data.get("format") != SNAPSHOT_FORMAT if is_snapshot else "ema" not in data):
        raise ValueError(f"{path}: not an EDM network file; {expected}")
    try:
        if not is_snapshot:
            return network_from_record(data["ema"]).eval()
        net = from_official_config(data["class_name"], data["kwargs"])
        load_weights(net, data["state_dict"])
        return net.eval()
    except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as e:   # missing entries, wrong arguments or tensors
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: the network in the file is inconsistent ({message})") from e


def for_sampling(net, device):
    """net in eval mode, without gradients, on `device`; on a CPU in the channels_last layout, which oneDNN's
    convolutions run natively (in the standard one each reorders its input and output): a sampling forward of
    CIFAR-10 DDPM++ ~1.1x faster on this project's CPU, the same numbers to float rounding (issue 29). Training
    stays in the standard layout (slower in channels_last here), and so do GPUs (not measured there)."""
    net = net.eval().requires_grad_(False).to(device)
    return net.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else net


def load_weights(net, state_dict):
    """net.load_state_dict(state_dict), refusing any missing, extra or misshapen tensor in one line.

    A missing tensor would leave its layer at the random initialization and an extra one would be
    ignored: either way the network would run and sample badly without a word."""
    own = net.state_dict()
    missing, extra = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    misshapen = sorted(k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape)
    problems = [f"{len(names)} {what} tensor(s), e.g. {', '.join(names[:2])}"
                for what, names in (("missing", missing), ("unexpected", extra), ("misshapen", misshapen)) if names]
    if problems:
        raise ValueError("its weights do not fit its configuration: " + "; ".join(problems))
    net.load_state_dict(state_dict, strict=True)


def open_checkpoint(path):
    """A local file, or an http(s) URL downloaded once into common.py's download cache."""
    if path.startswith(("http://", "https://")):
        return open(common.download(path, "the network"), "rb")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (pass an edm-*.pkl or network-snapshot-* "
                                "file, or its https URL)")
    return open(path, "rb")


# ----------------------------------------------------------------------------
# Official pickles, read as data.
#
# The official code pickles each network as "persistent class" records: the call
# `torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version,
# module_src (the full source file of the class), class_name, state (the module's
# __dict__: _init_kwargs, _parameters, _buffers, _modules, ...)}. Unpickling it the
# ordinary way executes module_src. Here the unpickler maps that one global to a
# function that just keeps `meta` as a `Record`, admits the few globals needed to
# rebuild tensors and containers, and refuses every other global before it is looked up.

class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle references a global that a network checkpoint has no business using (a ValueError:
    a bad file, reported like any other)."""


class Record:
    """A pickled object kept as data: its class name and its state dict, never instantiated."""
    class_name = None
    state = None

    def __setstate__(self, state):
        self.state = state


class ModuleDictRecord(Record):
    """torch.nn.ModuleDict (enc / dec), pickled as a plain object, not as a persistent record."""
    class_name = "ModuleDict"


def persistent_record(meta):
    if meta.get("type") != "class":
        raise UnsafePickleError(f"unsupported persistent object type {meta.get('type')!r}")
    record = Record()
    record.class_name, record.state = meta["class_name"], meta["state"]
    return record


def storage_from_bytes(data):
    """A tensor storage serialized by torch.save inside the pickle; read back with the weights-only loader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notice
        return torch.load(io.BytesIO(data), weights_only=True)


def numpy_scalar(dtype, data):
    """np.float64 and friends (e.g. skip_scale = np.sqrt(0.5) in the records), numeric types only."""
    if dtype.kind not in "biuf":
        raise UnsafePickleError(f"refusing numpy scalar of dtype {dtype}")
    return np.frombuffer(data, dtype)[0]


SAFE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): storage_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise UnsafePickleError(f"refusing to load: the pickle references the global '{module}.{name}', "
                                    "which is not part of an EDM network checkpoint")
        return SAFE_GLOBALS[(module, name)]


def record_state_dict(record, prefix=""):
    """The state dict a Record tree would have as a module: parameters, persistent buffers, submodules."""
    state = record.state
    result = {}
    for name, tensor in state["_parameters"].items():
        if tensor is not None:
            result[prefix + name] = tensor
    non_persistent = state.get("_non_persistent_buffers_set", set())
    for name, tensor in state["_buffers"].items():
        if tensor is not None and name not in non_persistent:
            result[prefix + name] = tensor
    for name, child in state["_modules"].items():
        if child is not None:
            result.update(record_state_dict(child, prefix + name + "."))
    return result


def network_from_record(record):
    """Rebuild an official preconditioned network (e.g. the 'ema' entry) from its record."""
    net = from_official_config(record.class_name, dict(record.state["_init_kwargs"]))
    load_weights(net, record_state_dict(record))
    return net


# ============================================================================
# Demo: parameters, FLOPs and throughput of the paper's networks.

def example_inputs(net, batch, device):
    """Random images, noise levels, one-hot labels and (if used) augmentation labels for `net`."""
    c, r = net.img_channels, net.img_resolution
    x = torch.randn(batch, c, r, r, device=device)
    sigma = torch.exp(torch.randn(batch, device=device) * 1.2 - 1.2)  # EDM's p_train (Table 1)
    labels = None
    if net.label_dim:
        labels = F.one_hot(torch.randint(net.label_dim, (batch,), device=device), net.label_dim).to(torch.float32)
    extra = {}
    if net.model.map_augment is not None:
        extra["augment_labels"] = torch.zeros(batch, net.model.map_augment.in_features, device=device)
    return x, sigma, labels, extra


def size_and_flops(class_name, kwargs):
    """Parameters, forward FLOPs of one image, and FLOPs per ladder entry, all on the meta device
    (shapes only: nothing is allocated or computed). FLOPs count 2 per multiply-add."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        net = from_official_config(class_name, kwargs).eval()
        x, sigma, labels, extra = example_inputs(net, 1, "meta")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(x, sigma, labels, **extra)
    per_module = counter.get_flop_counts()
    blocks = {}
    for part in ("enc", "dec"):
        for name in getattr(net.model, part):
            key = next((k for k in per_module if k.endswith(f"model.{part}.{name}")), None)
            blocks[f"{part}.{name}"] = sum(per_module[key].values()) if key else 0
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops(), blocks


def throughput(net, batch, iters, device, precision, channels_last, backward, warmup):
    """Images per second of forward passes (eval, no grad) or forward+backward passes (train mode).
    A warm-up step first (CUDA kernel selection, compilation) unless `warmup` is False."""
    x, sigma, labels, extra = example_inputs(net, batch, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = common.PRECISIONS[precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if backward:
                net(x, sigma, labels, **extra).square().mean().backward()
            else:
                with torch.no_grad():
                    net(x, sigma, labels, **extra)

    net.train(backward)
    if warmup:
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return batch * iters / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_shares(blocks):
    """{'32x32': share of the FLOPs spent at 32x32, ..., 'dec': share in the decoder} from size_and_flops's
    per-entry FLOPs ('enc.32x32_block0': ...)."""
    total = sum(blocks.values())
    shares = collections.Counter()
    for name, flops in blocks.items():
        part, entry = name.split(".", 1)
        shares[entry.split("_", 1)[0]] += flops / total
        shares["dec"] += flops / total if part == "dec" else 0
    return dict(shares)


def describe_shares(shares):
    """'decoder 68%; 32x32 72%, 16x16 22%, 8x8 6%': the rungs' shares, largest first."""
    rungs = sorted((k for k in shares if k != "dec"), key=shares.get, reverse=True)
    return f"decoder {shares['dec']:.0%}; " + ", ".join(f"{k} {shares[k]:.0%}" for k in rungs)


def plot_flops(results, file):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 1, figsize=(15, 4.6 * len(results)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], results.items()):
        entries = list(r["blocks"])
        values = [r["blocks"][k] / 1e9 for k in entries]
        colors = ["tab:blue" if k.startswith("enc") else "tab:orange" for k in entries]
        ax.bar(range(len(entries)), values, color=colors)
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([k.split(".", 1)[1] for k in entries], rotation=90, fontsize=9)
        ax.set_xlim(-0.7, len(entries) - 0.3)
        ax.set_xlabel("ladder entry, encoder (blue) then decoder (orange)", fontsize=10)
        ax.set_ylabel("GFLOPs per image")
        ax.set_title(f"{name}: {r['params'] / 1e6:.2f}M parameters, {r['gflops']:.1f} GFLOPs per image "
                     f"({describe_shares(r['shares'])})", fontsize=11)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def inspect_checkpoint(path):
    net = load_network(path)
    print(f"{path}: {net.init_config['class_name']} with {sum(p.numel() for p in net.parameters()):,} parameters")
    for key, value in net.init_config["kwargs"].items():
        print(f"  {key} = {value!r}")


def benchmark(args):
    """The demo: size, FLOPs and (where timed) throughput of each paper network, and the FLOPs figure."""
    device, outdir = common.start(__file__, args)
    batch = args.batch if args.batch is not None else 1 if device.type == "cpu" else 64
    iters = args.iters if args.iters is not None else 1 if device.type == "cpu" else 20

    print(f"device {device}, batch {batch}, {iters} timed step(s), precision {args.precision}"
          f"{', compiled' if args.compile else ''}{', channels_last' if args.channels_last else ''}")
    print(f"{'config':<24}{'parameters':>14}{'GFLOPs/img':>12}{'fwd img/s':>12}{'fwd+bwd img/s':>15}")
    timed = args.time if args.time is not None else [n for n in args.configs if device.type != "cpu" or "cifar10" in n]
    bench = dict(batch=batch, iters=iters, device=device, precision=args.precision, channels_last=args.channels_last,
                 warmup=device.type != "cpu" or args.compile)  # eager CPU needs no warm-up; saves minutes
    results = {}
    for name in args.configs:
        class_name, kwargs = PAPER_CONFIGS[name]
        params, flops, blocks = size_and_flops(class_name, kwargs)
        shares, res = flops_shares(blocks), kwargs["img_resolution"]
        top_two = shares[f"{res}x{res}"] + shares[f"{res // 2}x{res // 2}"]   # the two highest resolutions
        results[name] = dict(params=params, gflops=flops / 1e9, blocks=blocks, shares=shares, top_two=top_two)
        speeds = ["-", "-"]
        if name in timed:
            net = from_official_config(class_name, kwargs).to(device)
            if args.channels_last:
                net = net.to(memory_format=torch.channels_last)
            net = torch.compile(net) if args.compile else net
            speeds = [f"{throughput(net, backward=backward, **bench):.2f}" for backward in (False, True)]
            del net
        print(f"{name:<24}{params:>14,}{flops / 1e9:>12.2f}{speeds[0]:>12}{speeds[1]:>15}", flush=True)
    figure = os.path.join(outdir, "flops_per_block.png")
    plot_flops(results, figure)
    top_two = [r["top_two"] for r in results.values()]
    print(f"""
What this shows
  {figure}: the FLOPs of one forward pass along the resolution ladder.
    The two highest resolutions take {min(top_two):.0%}-{max(top_two):.0%} of them, and the decoder more than the encoder (one
    block more per rung, inputs widened by the skips). A rung down has a quarter of the pixels, but a block's
    cost per pixel grows with its channels squared: ADM's ladder (192 x 1, 2, 3, 4) spends more at 32x32 than
    at 64x64; the CIFAR-10 networks' (128 x 2, 2, 2) spends most at the top. Largest share first:""")
    for name, r in results.items():
        print(f"    {name:<22} {describe_shares(r['shares'])}")
    print("  Parameters: the paper's networks (Table 7), the official counts (tests/test_06_unet.py). A sampler calls")
    print("    the network once per NFE, so GFLOPs x NFE is the cost of one image.")


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--configs", nargs="+", choices=list(PAPER_CONFIGS), default=list(PAPER_CONFIGS), metavar="NAME",
                        help=f"which paper networks to report, of {', '.join(PAPER_CONFIGS)} (default: all three)")
    parser.add_argument("--time", nargs="*", choices=list(PAPER_CONFIGS), default=None, metavar="NAME",
                        help="which of them to time (default: all on GPU; on CPU the two CIFAR-10 networks, "
                             "since one ADM forward+backward takes minutes there)")
    parser.add_argument("--batch", type=common.number(int, low=1), default=None,
                        help="images per timed step (default: 1 on CPU, 64 on GPU)")
    parser.add_argument("--iters", type=common.number(int, low=1), default=None,
                        help="timed steps (default: 1 on CPU, 20 on GPU after a warm-up step)")
    parser.add_argument("--precision", default="fp32", choices=list(common.PRECISIONS), help="autocast precision (default: fp32)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(net)")
    parser.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")
    parser.add_argument("--load", metavar="PATH|URL", help="instead of the benchmark: load a checkpoint and print its configuration")
    return parser.parse_args(argv)


def demo(args):
    if args.load:
        inspect_checkpoint(args.load)
    else:
        benchmark(args)


def main(argv=None):
    common.run(demo, parse_args(argv))

if __name__ == "__main__":
    main()
