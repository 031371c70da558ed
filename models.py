"""
The networks of AMAES and its baselines, in one file that needs only torch.

    from models import build_model, load_encoder, count_parameters
    net = build_model("unet_b", in_channels=1, out_channels=2)        # segmentation
    pre = build_model("unet_b", in_channels=1, mode="pretrain")       # reconstruction
    report = load_encoder(net, {"arch": "unet_b", "encoder": pre.encoder.state_dict()})

Every network is an `EncoderDecoder`: `encoder(x)` returns a list of feature maps,
shallow to deep, and `decoder(features)` turns them into the output. Pretraining
trains `encoder` with a light decoder; finetuning moves `encoder` into a model with a
new segmentation decoder (the key prefix `encoder.` is the whole transfer contract).

Architectures (parameters with in 1 / out 2; README has the full table):
  unet_b, unet_xl     AMAES U-Net, F = 32 / 64: 22.58 M / 90.30 M (encoder 14.13 / 56.53)
  mednext_s/b/m/l     MedNeXt v1 encoder (kernel 3, no UpKern, no GRN). Segmentation
                      uses a U-Net decoder (F = 32, the AMAES form: 20.94 M for M,
                      55.20 M for L) unless decoder="native" asks for MedNeXt's own
                      additive-skip decoder (5,550,914 / 10,526,306 / 17,548,962 /
                      61,779,266).
  swinunetr           SwinUNETR v1, feature size 48: 62,186,708; pretrains as its SSL
                      model (rotation, contrastive, reconstruction heads): 19,097,191.
  resenc_l            ResEnc-L U-Net of Wald et al. (nnU-Net's residual encoder):
                      102,348,965 with in 1 / out 1; pretrains with that decoder,
                      skips kept.

Modes: "seg" = decoder with skips and `out_channels` classes; "pretrain" = the
lightweight reconstruction decoder of AMAES (one conv per stage, no skips, one output
channel per input channel), except resenc_l and swinunetr as described above.

Input sides must be divisible by `model.divisor` (16 for U-Net and MedNeXt, 32 for
SwinUNETR and ResEnc-L). The SwinUNETR SSL model needs at least two bottleneck tokens
(a patch of 64 along some axis) because its rotation and contrastive heads read
tokens 0 and 1.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint


def run(module, *args, enabled=False):
    """Call `module(*args)`, through activation checkpointing when enabled and a
    graph is being built: the stage's activations are recomputed in backward instead
    of stored, trading ~30 % more compute for much less memory."""
    if enabled and torch.is_grad_enabled():
        return _checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# -----------------------------------------------------------------------------
# U-Net (AMAES / Yucca) and the decoder every convolutional network shares


class ConvBlock(nn.Module):
    """Conv3d k3 (bias) -> InstanceNorm -> LeakyReLU(0.01)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class UNetEncoder(nn.Module):
    """5 stages of 2 ConvBlocks, channels F*[1, 2, 4, 8, 16], MaxPool3d(2) between."""

    def __init__(self, in_channels, width):
        super().__init__()
        self.channels = [width * m for m in (1, 2, 4, 8, 16)]
        cins = [in_channels] + self.channels[:-1]
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBlock(ci, co), ConvBlock(co, co)) for ci, co in zip(cins, self.channels)
        )
        self.pool = nn.MaxPool3d(2)
        self.checkpointing = False

    def forward(self, x):  # (B, C, D, H, W) -> 5 maps, (B, F*2^i, D/2^i, H/2^i, W/2^i)
        feats = []
        for i, stage in enumerate(self.stages):
            x = run(stage, self.pool(x) if i else x, enabled=self.checkpointing)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """Transposed-conv upsampling decoder over encoder channels `channels` (shallow to
    deep). skips=True concatenates each encoder map (segmentation); skips=False is the
    AMAES lightweight pretraining decoder. aux_heads adds nnU-Net's deep-supervision
    1x1 heads at every lower resolution; they exist so nnU-Net ResEnc-L weights and
    parameter counts match, and only train when deep_supervision is on."""

    def __init__(self, channels, out_channels, n_convs=2, skips=True, aux_heads=False):
        super().__init__()
        self.skips = skips
        self.ups = nn.ModuleList()
        self.stages = nn.ModuleList()
        for lo, hi in zip(channels[-2::-1], channels[:0:-1]):  # deep to shallow
            self.ups.append(nn.ConvTranspose3d(hi, lo, 2, stride=2))
            cin = 2 * lo if skips else lo
            self.stages.append(nn.Sequential(ConvBlock(cin, lo), *[ConvBlock(lo, lo) for _ in range(n_convs - 1)]))
        self.out = nn.Conv3d(channels[0], out_channels, 1)
        # heads for the outputs at 1/2^k resolution, deepest first (nnU-Net's order)
        self.aux = nn.ModuleList(nn.Conv3d(c, out_channels, 1) for c in channels[:0:-1][1:]) if aux_heads else None
        self.set_deep_supervision(False)
        self.checkpointing = False

    def set_deep_supervision(self, on):
        """Return [full-res, 1/2, 1/4, ...] outputs when on. Off, the aux heads have
        requires_grad False, so DDP and the optimizer ignore them."""
        self.deep_supervision = bool(on) and self.aux is not None
        if self.aux is not None:
            self.aux.requires_grad_(self.deep_supervision)

    def forward(self, feats):
        x, outs = feats[-1], []
        for i, (up, stage) in enumerate(zip(self.ups, self.stages)):
            x = up(x)
            if self.skips:
                x = torch.cat([x, feats[-2 - i]], dim=1)  # (B, 2C, ...)
            x = run(stage, x, enabled=self.checkpointing)
            if self.deep_supervision and i < len(self.aux):
                outs.append(self.aux[i](x))
        x = self.out(x)
        return [x] + outs[::-1] if self.deep_supervision else x


# -----------------------------------------------------------------------------
# MedNeXt v1 (Roy et al. 2023), kernel 3, no UpKern, no GRN


class MedNeXtBlock(nn.Module):
    """Depthwise conv -> GroupNorm(C groups) -> 1x1 expand r*C -> GELU -> 1x1 to cout.
    mode "down"/"up" makes the depthwise conv strided/transposed and adds a strided
    1x1 residual; plain blocks add the identity residual."""

    def __init__(self, cin, cout, exp_r, mode="same"):
        super().__init__()
        self.mode = mode
        if mode == "up":
            self.conv1 = nn.ConvTranspose3d(cin, cin, 3, stride=2, padding=1, groups=cin)
            self.res_conv = nn.ConvTranspose3d(cin, cout, 1, stride=2)
        else:
            self.conv1 = nn.Conv3d(cin, cin, 3, stride=2 if mode == "down" else 1, padding=1, groups=cin)
            if mode == "down":
                self.res_conv = nn.Conv3d(cin, cout, 1, stride=2)
        self.norm = nn.GroupNorm(cin, cin)
        self.conv2 = nn.Conv3d(cin, exp_r * cin, 1)
        self.act = nn.GELU()
        self.conv3 = nn.Conv3d(exp_r * cin, cout, 1)

    def forward(self, x):
        y = self.conv3(self.act(self.conv2(self.norm(self.conv1(x)))))
        if self.mode == "same":
            return x + y
        r = self.res_conv(x)
        if self.mode == "up":  # a k3 s2 p1 transposed conv gives 2n-1; pad to 2n at the front
            y, r = F.pad(y, (1, 0, 1, 0, 1, 0)), F.pad(r, (1, 0, 1, 0, 1, 0))
        return y + r


def _as_list(v, n=9):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


class MedNeXtEncoder(nn.Module):
    """Stem 1x1 conv to 32, then enc0..enc3 with down blocks, and the bottleneck.
    exp_r and blocks are indexed enc0-3, bottleneck, dec3-0 as in the paper."""

    def __init__(self, in_channels, exp_r, blocks, width=32):
        super().__init__()
        exp_r, blocks = _as_list(exp_r), _as_list(blocks)
        self.channels = [width * 2**i for i in range(5)]
        self.stem = nn.Conv3d(in_channels, width, 1)
        self.stages = nn.ModuleList()  # stage i: (down block from i-1 unless i == 0) + blocks
        for i, c in enumerate(self.channels):
            layers = [MedNeXtBlock(c // 2, c, exp_r[i], "down")] if i else []
            layers += [MedNeXtBlock(c, c, exp_r[i]) for _ in range(blocks[i])]
            self.stages.append(nn.Sequential(*layers))
        self.checkpointing = False

    def forward(self, x):  # -> 5 maps with channels 32..512
        x, feats = self.stem(x), []
        for stage in self.stages:
            x = run(stage, x, enabled=self.checkpointing)
            feats.append(x)
        return feats


class MedNeXtDecoder(nn.Module):
    """MedNeXt's own decoder: up block, add the skip, blocks; 1x1 transposed output."""

    def __init__(self, out_channels, exp_r, blocks, width=32):
        super().__init__()
        exp_r, blocks = _as_list(exp_r), _as_list(blocks)
        self.stages = nn.ModuleList()
        self.ups = nn.ModuleList()
        for j, level in enumerate((3, 2, 1, 0)):  # dec3..dec0 use exp_r[5..8]
            c = width * 2**level
            self.ups.append(MedNeXtBlock(2 * c, c, exp_r[5 + j], "up"))
            self.stages.append(nn.Sequential(*[MedNeXtBlock(c, c, exp_r[5 + j]) for _ in range(blocks[5 + j])]))
        self.out = nn.ConvTranspose3d(width, out_channels, 1)
        self.checkpointing = False

    def forward(self, feats):
        x = feats[-1]
        for i, (up, stage) in enumerate(zip(self.ups, self.stages)):
            x = run(stage, up(x) + feats[-2 - i], enabled=self.checkpointing)
        return self.out(x)


# -----------------------------------------------------------------------------
# ResEnc-L (Wald et al. 2024; nnU-Net's ResidualEncoderUNet)


class ResBlock(nn.Module):
    """nnU-Net BasicBlockD: conv-norm-act, conv-norm, + skip (avg-pool when strided,
    bias-free 1x1 conv + norm when channels change), act."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = ConvBlock(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True))
        skip = [nn.AvgPool3d(stride, stride)] if stride > 1 else []
        if cin != cout:
            skip += [nn.Conv3d(cin, cout, 1, bias=False), nn.InstanceNorm3d(cout, affine=True)]
        self.skip = nn.Sequential(*skip)  # empty Sequential = identity
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class ResEncoder(nn.Module):
    """Stem conv to 32, then 6 stages [32, 64, 128, 256, 320, 320] of [1, 3, 4, 6, 6, 6]
    residual blocks; the first block of stages 1-5 has stride 2."""

    def __init__(self, in_channels, features=(32, 64, 128, 256, 320, 320), blocks=(1, 3, 4, 6, 6, 6)):
        super().__init__()
        self.channels = list(features)
        self.stem = ConvBlock(in_channels, features[0])
        self.stages = nn.ModuleList()
        cin = features[0]
        for i, (c, n) in enumerate(zip(features, blocks)):
            self.stages.append(nn.Sequential(ResBlock(cin, c, 2 if i else 1), *[ResBlock(c, c) for _ in range(n - 1)]))
            cin = c
        self.checkpointing = False

    def forward(self, x):
        x, feats = self.stem(x), []
        for stage in self.stages:
            x = run(stage, x, enabled=self.checkpointing)
            feats.append(x)
        return feats


# -----------------------------------------------------------------------------
# SwinUNETR v1 (Hatamizadeh et al. 2022) and its SSL model (Tang et al. 2022).
# Submodule names follow the widely used public implementation so that its weights
# load through `swinunetr_key_map`.


def window_partition(x, ws):  # (B, D, H, W, C) -> (B * n_windows, ws0*ws1*ws2, C)
    b, d, h, w, c = x.shape
    x = x.view(b, d // ws[0], ws[0], h // ws[1], ws[1], w // ws[2], ws[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws[0] * ws[1] * ws[2], c)


def window_reverse(x, ws, b, d, h, w):  # inverse of window_partition
    x = x.view(b, d // ws[0], h // ws[1], w // ws[2], ws[0], ws[1], ws[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def window_and_shift(size, window, shift):
    """A window no larger than the map, and no shift along axes the window covers."""
    ws = [min(s, window) for s in size]
    ss = [0 if s <= window else shift for s in size]
    return ws, ss


def shift_mask(size, ws, ss, device):
    """(n_windows, N, N) additive mask: -100 between tokens that the cyclic shift
    brought together from different regions, as in Swin."""
    img = torch.zeros((1, *size, 1), device=device)
    cnt = 0
    for d in (slice(-ws[0]), slice(-ws[0], -ss[0]), slice(-ss[0], None)):
        for h in (slice(-ws[1]), slice(-ws[1], -ss[1]), slice(-ss[1], None)):
            for w in (slice(-ws[2]), slice(-ws[2], -ss[2]), slice(-ss[2], None)):
                img[:, d, h, w, :] = cnt
                cnt += 1
    win = window_partition(img, ws).squeeze(-1)  # (n_windows, N)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learned relative position bias."""

    def __init__(self, dim, heads, window=7):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        g = torch.arange(window)
        coords = torch.stack(torch.meshgrid(g, g, g, indexing="ij")).flatten(1)  # (3, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1  # (N, N, 3)
        index = rel[..., 0] * (2 * window - 1) ** 2 + rel[..., 1] * (2 * window - 1) + rel[..., 2]
        self.register_buffer("relative_position_index", index)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # x (B*nW, N, C); mask (nW, N, N) or None
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B*nW, h, N, d)
        # A window smaller than 7 reads the top-left corner of the index, as the
        # public implementation does, so its weights mean the same here.
        bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).to(q.dtype)  # (h, N, N)
        if mask is not None:  # group windows per sample so the mask broadcasts over the batch
            nw = mask.shape[0]
            q, k, v = (t.view(bw // nw, nw, self.heads, n, -1) for t in (q, k, v))
            bias = bias + mask.unsqueeze(1).to(q.dtype)  # (nW, h, N, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.reshape(bw, self.heads, n, -1).transpose(1, 2).reshape(bw, n, c))


class SwinMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMLP(dim, 4 * dim)

    def attention(self, x, mask):  # (B, D, H, W, C), channels last
        b, d, h, w, c = x.shape
        ws, ss = window_and_shift((d, h, w), self.window, self.shift)
        pads = [(-s) % k for s, k in zip((d, h, w), ws)]
        x = F.pad(self.norm1(x), (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        dp, hp, wp = x.shape[1:4]
        shifted = any(ss)
        if shifted:
            x = torch.roll(x, shifts=[-s for s in ss], dims=(1, 2, 3))
        x = self.attn(window_partition(x, ws), mask if shifted else None)
        x = window_reverse(x, ws, b, dp, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=ss, dims=(1, 2, 3))
        return x[:, :d, :h, :w]

    def forward(self, x, mask):
        x = x + self.attention(x, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2x2 neighbourhood -> LayerNorm(8C) -> Linear(8C, 2C). The eight sub-grids are
    concatenated in MONAI's order, so its weights mean the same here. legacy=True is
    the order of MONAI 0.9 until its PR 8285 (fixed in 1.5.0), which took (0, 1, 0)
    and (0, 0, 1) twice and (1, 1, 0), (0, 1, 1) never: Tang et al.'s and
    BrainSegFounder's released weights were trained with it."""

    ORDER = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    LEGACY = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]

    def __init__(self, dim, legacy=False):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.offsets = self.LEGACY if legacy else self.ORDER

    def forward(self, x):  # (B, D, H, W, C) -> (B, D/2, H/2, W/2, 2C)
        d, h, w = x.shape[1:4]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2] for i, j, k in self.offsets], dim=-1)
        return self.reduction(self.norm(x))


class SwinLayer(nn.Module):
    """`depth` Swin blocks alternating plain and shifted windows, then PatchMerging."""

    def __init__(self, dim, depth, heads, window=7, legacy_merge=False):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, legacy_merge)

    def forward(self, x):  # (B, C, D, H, W) -> (B, 2C, D/2, H/2, W/2)
        x = x.permute(0, 2, 3, 4, 1)
        size = x.shape[1:4]
        ws, ss = window_and_shift(size, self.window, self.window // 2)
        padded = [math.ceil(s / k) * k for s, k in zip(size, ws)]
        mask = shift_mask(padded, ws, ss, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.downsample(x).permute(0, 4, 1, 2, 3)


class SwinViT(nn.Module):
    """The SwinUNETR encoder: 2^3 patch embedding, 4 Swin layers. Returns the input
    itself (the decoder's first residual block reads it) and the five hidden states,
    each layer-normed over channels without affine parameters."""

    def __init__(
        self, in_channels, feature_size=48, depths=(2, 2, 2, 2), heads=(3, 6, 12, 24), window=7, legacy_merge=False
    ):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(in_channels, feature_size, 2, stride=2)
        self.layers = nn.ModuleList(
            SwinLayer(feature_size * 2**i, depths[i], heads[i], window, legacy_merge) for i in range(len(depths))
        )
        self.channels = [in_channels] + [feature_size * 2**i for i in range(len(depths) + 1)]
        self.checkpointing = False

    @staticmethod
    def norm(x):  # layer norm over C of (B, C, D, H, W)
        return F.layer_norm(x.permute(0, 2, 3, 4, 1), x.shape[1:2]).permute(0, 4, 1, 2, 3)

    def forward(self, x):  # (B, Cin, D, H, W), sides divisible by 32
        h = self.patch_embed.proj(x)  # (B, 48, D/2, H/2, W/2)
        feats = [x, self.norm(h)]
        for layer in self.layers:
            h = run(layer, h, enabled=self.checkpointing)
            feats.append(self.norm(h))  # (B, 48*2^(i+1), D/2^(i+2), ...)
        return feats


class UnetResBlock(nn.Module):
    """UNETR residual block: conv-IN-lrelu, conv-IN, + (1x1 conv-IN when channels
    change), lrelu. Bias-free convs; InstanceNorm without affine (the public default)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm1, self.norm2 = nn.InstanceNorm3d(cout), nn.InstanceNorm3d(cout)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.downsample = cin != cout
        if self.downsample:
            self.conv3 = nn.Conv3d(cin, cout, 1, bias=False)
            self.norm3 = nn.InstanceNorm3d(cout)

    def forward(self, x):
        y = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
        return self.lrelu(y + (self.norm3(self.conv3(x)) if self.downsample else x))


class UnetrUpBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.transp_conv = nn.ConvTranspose3d(cin, cout, 2, stride=2, bias=False)
        self.conv_block = UnetResBlock(2 * cout, cout)

    def forward(self, x, skip):
        return self.conv_block(torch.cat([self.transp_conv(x), skip], dim=1))


class SwinUNETRDecoder(nn.Module):
    def __init__(self, in_channels, out_channels, fs=48):
        super().__init__()
        self.encoder1 = UnetResBlock(in_channels, fs)
        self.encoder2 = UnetResBlock(fs, fs)
        self.encoder3 = UnetResBlock(2 * fs, 2 * fs)
        self.encoder4 = UnetResBlock(4 * fs, 4 * fs)
        self.encoder10 = UnetResBlock(16 * fs, 16 * fs)
        self.decoder5 = UnetrUpBlock(16 * fs, 8 * fs)
        self.decoder4 = UnetrUpBlock(8 * fs, 4 * fs)
        self.decoder3 = UnetrUpBlock(4 * fs, 2 * fs)
        self.decoder2 = UnetrUpBlock(2 * fs, fs)
        self.decoder1 = UnetrUpBlock(fs, fs)
        self.out = nn.Conv3d(fs, out_channels, 1)
        self.checkpointing = False

    def forward(self, feats):
        x, h0, h1, h2, h3, h4 = feats
        ck = self.checkpointing
        enc0, enc1 = run(self.encoder1, x, enabled=ck), run(self.encoder2, h0, enabled=ck)
        enc2, enc3 = run(self.encoder3, h1, enabled=ck), run(self.encoder4, h2, enabled=ck)
        y = run(self.encoder10, h4, enabled=ck)
        for block, skip in (
            (self.decoder5, h3),
            (self.decoder4, enc3),
            (self.decoder3, enc2),
            (self.decoder2, enc1),
            (self.decoder1, enc0),
        ):
            y = run(block, y, skip, enabled=ck)
        return self.out(y)


class SwinSSLHeads(nn.Module):
    """Tang et al.'s heads on the 768-channel bottleneck: rotation (4 classes) on token 0,
    contrastive embedding (512) on token 1, and a 5-stage convolutional reconstruction
    of the input. Returns (rot (B, 4), contrastive (B, 512), reconstruction (B, Cin, ...))."""

    def __init__(self, in_channels, dim=768):
        super().__init__()
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, 512)
        chans = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        layers = []
        for ci, co in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv3d(ci, co, 3, padding=1),
                nn.InstanceNorm3d(co),
                nn.LeakyReLU(),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
        self.conv = nn.Sequential(*layers, nn.Conv3d(chans[-1], in_channels, 1))

    def forward(self, feats):
        x = feats[-1]  # (B, 768, D/32, H/32, W/32)
        if x[0, 0].numel() < 2:
            raise ValueError(
                f"SwinUNETR SSL needs >= 2 bottleneck tokens; input side(s) {[32 * s for s in x.shape[2:]]} "
                "give 1. Use a patch of at least 64 along one axis."
            )
        tokens = x.flatten(2).transpose(1, 2)  # (B, n_tokens, 768)
        return self.rotation_head(tokens[:, 0]), self.contrastive_head(tokens[:, 1]), self.conv(x)


def swinunetr_key_map(key):
    """Map a key of the public SwinUNETR v1 / SSLHead state dict to this file's name,
    or None for keys with no counterpart (unused *_pre identities hold none).
    swinViT.layers{i}.0.X -> encoder.layers.{i-1}.X; Convolution wrappers' `.conv.`
    and UnetrBasicBlock's `.layer.` are dropped; everything else goes under decoder."""
    k = key[len("module.") :] if key.startswith("module.") else key
    if k.startswith("swinViT."):
        k = k[len("swinViT.") :]
        if k.startswith("layers") and k[6].isdigit():
            k = f"layers.{int(k[6]) - 1}." + k.split(".", 2)[2]
        return "encoder." + k
    k = k.replace(".layer.", ".", 1).replace(".conv.conv.", ".").replace(".conv.", ".")
    return "decoder." + k


# -----------------------------------------------------------------------------
# Released pretrained weights: one small key map per format, onto this file's names


def amaes_key_map(key):
    """AMAES (Munk et al., github.com/asbjrnmunk/amaes src/models/networks, Zenodo
    13604788) network keys (after "model." / "_orig_mod.") -> this file's, or None.
    U-Net: encoder.in_conv / encoder_conv{i} .conv{j}.{conv,norm}; MedNeXt:
    encoder.stem, enc_block_{i}.{b}, down_{i}, bottleneck.{b}; the lightweight
    decoder rec_head.upsample{i}, decoder_conv{i}.conv{j}, out_conv."""
    p = key.split(".")
    if key.startswith("encoder.in_conv.conv"):
        return f"encoder.stages.0.{int(p[2][4:]) - 1}." + ".".join(p[3:])
    if key.startswith("encoder.encoder_conv"):
        return f"encoder.stages.{p[1][12:]}.{int(p[2][4:]) - 1}." + ".".join(p[3:])
    if key.startswith("encoder.enc_block_"):
        i = int(p[1][10:])
        return f"encoder.stages.{i}.{int(p[2]) + (i > 0)}." + ".".join(p[3:])  # stages 1-4 open with their down block
    if key.startswith("encoder.down_"):
        return f"encoder.stages.{int(p[1][5:]) + 1}.0." + ".".join(p[2:])
    if key.startswith("encoder.bottleneck."):
        return f"encoder.stages.4.{int(p[2]) + 1}." + ".".join(p[3:])
    if key.startswith("encoder.stem."):
        return key
    if key.startswith(("rec_head.", "pred_head.")):
        if p[1].startswith("upsample"):
            return f"decoder.ups.{int(p[1][8:]) - 1}." + ".".join(p[2:])
        if p[1].startswith("decoder_conv"):
            return f"decoder.stages.{int(p[1][12:]) - 1}.{int(p[2][4:]) - 1}." + ".".join(p[3:])
        if p[1] == "out_conv":
            return "decoder.out." + ".".join(p[2:])
    return None


def nnssl_key_map(key):
    """nnssl / OpenMind (Wald et al., github.com/MIC-DKFZ/nnssl; dynamic-network-
    architectures' ResidualEncoderUNet) keys -> this file's, or None for the aliases
    (all_modules.*, the decoder's copy of the encoder)."""
    if "all_modules" in key or key.startswith("decoder.encoder."):
        return None
    p = key.split(".")
    if key.startswith("encoder.stem.convs.0."):
        return "encoder.stem." + ".".join(p[4:])
    if key.startswith("encoder.stages."):  # encoder.stages.S.blocks.B.{conv1, conv2, skip}...
        head, rest = f"encoder.stages.{p[2]}.{p[4]}.", p[5:]
        if rest[0] == "conv2":
            return head + "conv2." + ("0." if rest[1] == "conv" else "1.") + ".".join(rest[2:])
        if rest[0] == "skip":  # [pool,] conv-norm block -> [pool,] conv, norm
            return head + f"skip.{int(rest[1]) + (rest[2] == 'norm')}." + ".".join(rest[3:])
        return head + ".".join(rest)
    if key.startswith("decoder.stages."):
        return f"decoder.stages.{p[2]}.{p[4]}." + ".".join(p[5:])
    if key.startswith("decoder.transpconvs."):
        return "decoder.ups." + ".".join(p[2:])
    if key.startswith("decoder.seg_layers."):  # deepest first; the last one is the full-resolution output
        return ("decoder.out." if int(p[2]) == 4 else f"decoder.aux.{p[2]}.") + ".".join(p[3:])
    return None


def tang_key_map(key):
    """MONAI SwinUNETR-SSL (Tang et al. 2022) model_swinvit.pt: the Swin encoder under
    "module." with the MLP as mlp.fc1 / fc2 (MONAI's load_from reads those since its
    PR 4311); its extra final LayerNorm module.norm.* has no counterpart (None)."""
    k = key[len("module.") :] if key.startswith("module.") else key
    if k.startswith("norm."):
        return None
    return swinunetr_key_map("swinViT." + k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2."))


FORMATS = {
    "kit": "this kit's encoder.pt or ckpt.pt",
    "amaes": "AMAES *_lw_dec_fullaug.pth (Zenodo 13604788: a Lightning state dict, network under model.)",
    "nnssl": "nnssl / OpenMind ResEnc-L (a dict with network_weights and nnssl_adaptation_plan)",
    "tang": "MONAI SwinUNETR-SSL model_swinvit.pt ({'state_dict': {'module.patch_embed...', 'module.layers1...'}})",
    "brainsegfounder": "BrainSegFounder stage 1/2 ({'state_dict': {'module.swinViT...', heads}})",
}


def _arch_of(state):
    """The arch of a state dict in this file's names, from its encoder's shapes."""
    if "encoder.stages.0.0.conv.weight" in state:
        return {32: "unet_b", 64: "unet_xl"}.get(state["encoder.stages.0.0.conv.weight"].shape[0])
    if "encoder.stem.weight" in state:  # MedNeXt: blocks and expansion ratios of enc0-3 and the bottleneck
        blocks = [
            len({k.split(".")[3] for k in state if k.startswith(f"encoder.stages.{i}.") and k.endswith("conv3.weight")})
            - (i > 0)
            for i in range(5)
        ]
        exp = [state[f"encoder.stages.{i}.{int(i > 0)}.conv2.weight"].shape[0] // 32 // 2**i for i in range(5)]
        for name, v in ARCHS.items():
            if v["family"] == "mednext" and [
                (_as_list(v["blocks"])[i], _as_list(v["exp_r"])[i]) for i in range(5)
            ] == list(zip(blocks, exp)):
                return name
        return None
    if "encoder.stem.conv.weight" in state:
        return "resenc_l"
    if "encoder.patch_embed.proj.weight" in state:
        return "swinunetr"
    return None


def read_pretrained(ckpt):
    """Any checkpoint dict this kit accepts -> {"format", "arch", "in_channels",
    "model": {this file's key: tensor} (encoder.* and whatever decoder maps),
    "unused": [the file's keys with no counterpart], "legacy_merge"}. The format is
    detected from the contents; ValueError (naming the accepted formats) otherwise."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"a {type(ckpt).__name__}, not a checkpoint dict")
    fmt, key_map, state, legacy = None, None, None, False
    if "encoder" in ckpt and isinstance(ckpt["encoder"], dict):  # the kit's encoder.pt
        fmt, state = "kit", {"encoder." + k: v for k, v in ckpt["encoder"].items()}
    elif "model" in ckpt and isinstance(ckpt["model"], dict) and "arch" in ckpt:  # the kit's ckpt.pt
        fmt, state = "kit", ckpt["model"]
    elif "network_weights" in ckpt and "nnssl_adaptation_plan" in ckpt:
        fmt, key_map, state = "nnssl", nnssl_key_map, ckpt["network_weights"]
    else:
        raw = ckpt.get("state_dict", ckpt)
        if isinstance(raw, dict) and raw:
            keys = list(raw)
            strip = [k.replace("_orig_mod.", "") for k in keys]
            if all(isinstance(v, torch.Tensor) for v in raw.values()) or "state_dict" in ckpt:
                # saved from DistributedDataParallel ("module.") or from one process (no prefix)
                if any(k.startswith(("module.swinViT.", "swinViT.")) for k in keys):
                    fmt, key_map, legacy = "brainsegfounder", swinunetr_key_map, True
                elif any(
                    k.startswith(("module.layers1.", "module.patch_embed.", "layers1.", "patch_embed.")) for k in keys
                ):
                    fmt, key_map, legacy = "tang", tang_key_map, True
                elif any(k.startswith(("model.encoder.", "encoder.")) for k in strip):
                    fmt, key_map = "amaes", amaes_key_map
                    raw = {
                        (k[len("model.") :] if k.startswith("model.") else k): v for k, v in zip(strip, raw.values())
                    }
            state = raw
    if fmt is None:
        raise ValueError("matches no layout this kit reads; accepted: " + "; ".join(FORMATS.values()))
    own = {}
    unused = []
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        new = key_map(k) if key_map else k
        if new is None:
            unused.append(k)
        else:
            own[new] = v
    arch = ckpt.get("arch") if fmt == "kit" else _arch_of(own)
    if arch is None or not any(k.startswith("encoder.") for k in own):
        raise ValueError(f"looks like {FORMATS[fmt]} but holds no encoder this kit knows")
    stem = {
        "unet": "encoder.stages.0.0.conv.weight",
        "mednext": "encoder.stem.weight",
        "resenc": "encoder.stem.conv.weight",
        "swin": "encoder.patch_embed.proj.weight",
    }[ARCHS[arch]["family"]]
    return {
        "format": fmt,
        "arch": arch,
        "in_channels": int(own[stem].shape[1]),
        "model": own,
        "unused": unused,
        "legacy_merge": bool(legacy or ckpt.get("legacy_merge", False)),
    }


# -----------------------------------------------------------------------------
# One model class, the variants, and the transfer


class EncoderDecoder(nn.Module):
    def __init__(self, arch, mode, encoder, decoder, divisor, in_channels, out_channels):
        super().__init__()
        self.arch, self.mode, self.divisor = arch, mode, divisor
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x):  # (B, Cin, D, H, W), sides divisible by self.divisor
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"{self.arch}: input sides {list(x.shape[2:])} must be divisible by {self.divisor}")
        if self.training and math.prod(s // self.divisor for s in x.shape[2:]) < 2:
            # InstanceNorm cannot normalise a single bottleneck voxel while training
            raise ValueError(
                f"{self.arch}: input {list(x.shape[2:])} leaves one bottleneck voxel; "
                f"use a side of at least {2 * self.divisor} for training"
            )
        return self.decoder(self.encoder(x))

    def set_checkpointing(self, on=True):
        """Activation checkpointing per stage (off by default): for XL at 128^3 on a small GPU."""
        for m in self.modules():
            if hasattr(m, "checkpointing"):
                m.checkpointing = bool(on)
        return self


ARCHS = {
    "unet_b": dict(family="unet", width=32),
    "unet_xl": dict(family="unet", width=64),
    "mednext_s": dict(family="mednext", exp_r=2, blocks=2),
    "mednext_b": dict(family="mednext", exp_r=[2, 3, 4, 4, 4, 4, 4, 3, 2], blocks=2),
    "mednext_m": dict(family="mednext", exp_r=[2, 3, 4, 4, 4, 4, 4, 3, 2], blocks=[3, 4, 4, 4, 4, 4, 4, 4, 3]),
    "mednext_l": dict(family="mednext", exp_r=[3, 4, 8, 8, 8, 8, 8, 4, 3], blocks=[3, 4, 8, 8, 8, 8, 8, 4, 3]),
    "swinunetr": dict(family="swin", feature_size=48),
    "resenc_l": dict(family="resenc", features=[32, 64, 128, 256, 320, 320], blocks=[1, 3, 4, 6, 6, 6]),
}


def patch_rule(arch):
    """(divisor, smallest training side) of an arch's input: sides divide by the total
    downsampling, and training needs two bottleneck voxels (InstanceNorm)."""
    divisor = 32 if ARCHS[arch]["family"] in ("swin", "resenc") else 16
    return divisor, 2 * divisor


def build_model(
    arch, in_channels=1, out_channels=None, mode="seg", decoder=None, checkpointing=False, legacy_merge=False
):
    """Build `arch` (a key of ARCHS) as a segmentation ("seg", out_channels classes) or
    pretraining ("pretrain", out_channels defaults to in_channels) network.
    decoder: MedNeXt only, "unet" (default, the AMAES form) or "native".
    legacy_merge: SwinUNETR only, MONAI's old PatchMerging order (for Tang et al.'s
    and BrainSegFounder's weights; see PatchMerging)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    if mode not in ("seg", "pretrain"):
        raise ValueError(f"mode must be 'seg' or 'pretrain', not {mode!r}")
    if decoder not in (None, "unet", "native") or (decoder == "native" and not arch.startswith("mednext")):
        raise ValueError(f"decoder={decoder!r} is only for MedNeXt ('unet' or 'native')")
    if out_channels is None:
        if mode == "seg":
            raise ValueError("segmentation models need out_channels (the number of classes, background included)")
        out_channels = in_channels
    v = ARCHS[arch]
    fam = v["family"]
    if fam in ("unet", "mednext"):
        if fam == "unet":
            enc = UNetEncoder(in_channels, v["width"])
        else:
            enc = MedNeXtEncoder(in_channels, v["exp_r"], v["blocks"])
        if mode == "pretrain":
            dec = UNetDecoder(enc.channels, out_channels, n_convs=1, skips=False)
        elif decoder == "native":
            dec = MedNeXtDecoder(out_channels, v["exp_r"], v["blocks"])
        else:
            dec = UNetDecoder(enc.channels, out_channels)  # F = 32 for MedNeXt: its channels are 32..512
    elif fam == "resenc":
        enc = ResEncoder(in_channels, v["features"], v["blocks"])
        dec = UNetDecoder(enc.channels, out_channels, n_convs=1, aux_heads=True)
    else:
        enc = SwinViT(in_channels, v["feature_size"], legacy_merge=legacy_merge)
        dec = (
            SwinSSLHeads(in_channels)
            if mode == "pretrain"
            else SwinUNETRDecoder(in_channels, out_channels, v["feature_size"])
        )
    # PyTorch's default initialisation throughout (kaiming_uniform with a = sqrt(5),
    # uniform biases), as the AMAES networks (Yucca, weightInitializer None) and nnssl's
    # ResEnc-L MAE path use: no He-normal re-initialisation.
    model = EncoderDecoder(arch, mode, enc, dec, patch_rule(arch)[0], in_channels, out_channels)
    model.legacy_merge = bool(legacy_merge) and fam == "swin"
    return model.set_checkpointing(checkpointing)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def describe(model):
    """One line for the scripts to print: arch, mode and parameter counts."""
    n, e = count_parameters(model), count_parameters(model.encoder)
    return f"{model.arch} ({model.mode}): {n:,} parameters ({n / 1e6:.2f} M), encoder {e:,} ({e / 1e6:.2f} M)"


def adapt_first_conv(w, cin):
    """A pretrained input convolution (O, c, ...) for cin input channels: the kernel is
    tiled along the channel axis and scaled by c / cin, so an input whose channels are
    all equal to the pretraining image gives exactly the pretrained activations."""
    c = w.shape[1]
    reps = math.ceil(cin / c)
    return w.repeat(1, reps, *[1] * (w.dim() - 2))[:, :cin] * (c / cin)


def load_encoder(model, ckpt, adapt_stem=False):
    """Load pretrained encoder weights into `model.encoder`.

    ckpt: any checkpoint dict read_pretrained accepts (the kit's encoder.pt, a
    released file), or a plain encoder state dict. Every encoder key must match by
    name; tensors must match by shape, except a 5-D input convolution whose
    input-channel axis differs (a 1-channel encoder finetuned on 4-channel BraTS).
    That one keeps its fresh initialisation, as in the authors' transfer (AMAES: load
    what matches by name and shape; BrainSegFounder's BraTS finetuning replaces the
    whole patch embedding, so its bias stays fresh too), or with adapt_stem=True is
    tiled over the channels by `adapt_first_conv` (nnssl's transfer; for AMAES our
    option: it gives the pretrained features to an input of equal channels).
    Anything else raises ValueError listing the offending keys.
    Returns {"loaded", "adapted", "fresh", "unused", "format"} for the scripts to report.
    """
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected an encoder checkpoint dict, got {type(ckpt).__name__}")
    if {"format", "model", "unused"} <= set(ckpt):  # already read_pretrained's output
        pre = ckpt
    elif (
        ckpt
        and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        and not any(k.split(".")[0] in ("encoder", "model", "module") for k in ckpt)
    ):  # a bare encoder state dict
        pre = {"format": "kit", "arch": None, "model": {"encoder." + k: v for k, v in ckpt.items()}, "unused": []}
    else:
        pre = read_pretrained(ckpt)
    if pre["arch"] is not None and pre["arch"] != getattr(model, "arch", pre["arch"]):
        raise ValueError(
            f"encoder was pretrained as {pre['arch']!r} but the model is {model.arch!r}; "
            f"use --arch {pre['arch']} or another encoder"
        )
    state = {k[len("encoder.") :]: v for k, v in pre["model"].items() if k.startswith("encoder.")}
    own = model.encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:

        def short(keys):
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")

        raise ValueError(
            f"encoder weights do not fit {getattr(model, 'arch', 'this model')}: "
            f"missing [{short(missing)}]; unexpected [{short(unexpected)}]"
        )
    new, adapted, fresh = {}, [], []
    for k, t in state.items():
        if t.shape != own[k].shape:
            if t.dim() == 5 and t.shape[0] == own[k].shape[0] and t.shape[2:] == own[k].shape[2:]:
                if not adapt_stem:
                    fresh.append(k)
                    continue
                t = adapt_first_conv(t, own[k].shape[1])
                adapted.append(k)
            else:
                raise ValueError(f"encoder tensor {k} has shape {tuple(t.shape)}, model expects {tuple(own[k].shape)}")
        new[k] = t.to(own[k].dtype)
    if pre["format"] == "brainsegfounder":  # its BraTS finetuning replaces the whole patch-embedding conv
        for k in list(fresh):
            bias = k[: -len("weight")] + "bias"
            if k.endswith(".weight") and bias in new:
                del new[bias]
                fresh.append(bias)
    model.encoder.load_state_dict(new, strict=not fresh)
    return {
        "loaded": sorted(set(new) - set(adapted)),
        "adapted": adapted,
        "fresh": fresh,
        "unused": pre["unused"] + sorted(k for k in pre["model"] if not k.startswith("encoder.")),
        "format": pre["format"],
    }


def convert(src, dst, arch=None):
    """A released checkpoint file -> the kit's encoder.pt (for people who copy this
    file alone): python models.py convert SRC DST [--arch ARCH]."""
    pre = read_pretrained(torch.load(src, map_location="cpu", weights_only=True))
    if arch is not None and arch != pre["arch"]:
        raise ValueError(f"{src} holds {pre['arch']} weights, not {arch}")
    out = {
        "arch": pre["arch"],
        "in_channels": pre["in_channels"],
        "format": pre["format"],
        "legacy_merge": pre["legacy_merge"],
        "encoder": {k[len("encoder.") :]: v for k, v in pre["model"].items() if k.startswith("encoder.")},
    }
    torch.save(out, str(dst) + ".tmp")
    os.replace(str(dst) + ".tmp", dst)
    return out


if __name__ == "__main__":
    import argparse
    import pickle

    class Parser(argparse.ArgumentParser):  # errors as one line, as the kit's other scripts
        def error(self, message):
            self.exit(2, f"models.py: error: {message} (see python models.py --help)\n")

    p = Parser(
        prog="models.py",
        description="models.py convert SRC DST: a released pretrained checkpoint "
        "(" + "; ".join(FORMATS.values()) + ") -> this kit's encoder.pt",
    )
    p.add_argument("command", choices=["convert"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--arch", choices=list(ARCHS), help="check that the file holds this arch")
    a = p.parse_args()
    folder = os.path.dirname(os.path.abspath(a.dst))
    if not os.path.isfile(a.src):
        p.exit(2, f"models.py: error: {a.src}: no such file\n")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        p.exit(
            2,
            f"models.py: error: {a.dst}: the folder {folder} "
            + ("is not writable\n" if os.path.isdir(folder) else "does not exist; make it first\n"),
        )
    try:
        out = convert(a.src, a.dst, a.arch)
    except (pickle.UnpicklingError, KeyError, EOFError) as e:  # torch.load of something that is not a checkpoint
        why = (
            "holds pickled Python objects, refused unread (only tensors and plain values are loaded)"
            if any(w in str(e) for w in ("Unsupported global", "GLOBAL ", "Unsupported class"))
            else f"not a torch checkpoint, or a truncated one "
            f"({type(e).__name__}); give a released weights file (.pt / .pth / .ckpt)"
        )
        p.exit(2, f"models.py: error: {a.src}: {why}\n")
    except (OSError, RuntimeError, ValueError) as e:
        p.exit(2, f"models.py: error: {a.src}: {str(e).splitlines()[0][:300]}\n")
    print(
        f"{a.dst}: {out['arch']} encoder ({len(out['encoder'])} tensors, {out['in_channels']} input channel(s)) "
        f"from {FORMATS[out['format']]}" + (", MONAI's legacy PatchMerging order" if out["legacy_merge"] else "")
    )
