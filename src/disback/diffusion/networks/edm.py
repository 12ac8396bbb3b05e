"""EDM's pixel-space backbones: ``SongUNet`` (DDPM++ and NCSN++) and ``DhariwalUNet`` (ADM).

These are the networks ``F_theta`` inside EDM's preconditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Eq. 7):

    D_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))

``forward(x, noise_labels, class_labels, augment_labels=None)`` takes ``c_in·x`` and ``c_noise`` and returns ``F``;
the preconditioning (``c_skip``, ``c_out``, ``c_in``, ``c_noise``) belongs to the module that wraps the network.

The purpose is to run NVIDIA's released EDM checkpoints (``edm-*.pkl``, read without unpickling code by disback's
snapshot reader in ``disback.storage``) and the networks distilled from them. So:

- class names and constructor arguments are EDM's, so that a snapshot's ``_init_kwargs`` pass straight in;
- ``state_dict()`` has exactly the checkpoint's keys, in its registration order (``map_noise.freqs``,
  ``enc.16x16_down.conv0.resample_filter``, ``dec.32x32_aux_norm.weight``, ``out_conv.bias``, ...), and a parameter
  that EDM leaves out (``None``) is left out here too, so ``load_state_dict(strict=True)`` holds;
- every layer runs the same sequence of floating-point operations as EDM's (bias added after the convolution, ``k``
  scaled in the model's dtype before an fp32 softmax, ...), so that outputs agree to float32 rounding.

Where the facts come from: the behaviour of NVlabs/edm ``training/networks.py`` (commit 008a4e5) as written down in
the team's reference notes on EDM checkpoints (architecture rules, key order, numeric pitfalls); details (the fused
resampling paddings, initialisation scales) were checked against a stored copy of that file. This is a clean-room
implementation: the structure, helpers and text here are disback's own; only the public class and argument names
follow EDM, because checkpoints depend on them.

Differences from EDM that do not change outputs: the plain convolution (no resampling) is a ``torch.nn.Conv2d``
subclass and ``Linear`` a ``torch.nn.Linear`` subclass, so that peft's LoRA can wrap them; a convolution that up- or
downsamples is a separate class, ``ResampleConv2d``; attention weights are differentiated by autograd instead of a
hand-written backward (same values, a little more memory in training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NETWORKS",
    "Conv2d",
    "DhariwalUNet",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "ResampleConv2d",
    "SongUNet",
    "UNetBlock",
    "attention_weights",
    "make_conv2d",
    "resample_kernel",
]

InitKwargs = dict[str, Any]  # init_mode / init_weight / init_bias, as EDM's layers take them


# ---------------------------------------------------------------------------------------------------------------------
# Initialisation. A checkpoint overwrites all of it; it matters only for a network trained from scratch.


def _draw_init(tensor: torch.Tensor, mode: str, fan_in: int, fan_out: int, gain: float) -> None:
    """Fill ``tensor`` in place from EDM's init family ``mode``, times ``gain``.

    The four families are the textbook ones with EDM's scales: uniform bounds sqrt(6/(fan_in+fan_out)) (Xavier) and
    sqrt(3/fan_in) (Kaiming), normal std sqrt(2/(fan_in+fan_out)) and sqrt(1/fan_in).
    """
    with torch.no_grad():
        if gain == 0:
            tensor.zero_()  # zero-init (last convolutions, ADM's map_augment) needs no random draw
            return
        if mode == "xavier_uniform":
            tensor.uniform_(-math.sqrt(6 / (fan_in + fan_out)), math.sqrt(6 / (fan_in + fan_out)))
        elif mode == "xavier_normal":
            tensor.normal_(0.0, math.sqrt(2 / (fan_in + fan_out)))
        elif mode == "kaiming_uniform":
            tensor.uniform_(-math.sqrt(3 / fan_in), math.sqrt(3 / fan_in))
        elif mode == "kaiming_normal":
            tensor.normal_(0.0, math.sqrt(1 / fan_in))
        else:
            raise ValueError(f"unknown init_mode '{mode}'; available: xavier_uniform, xavier_normal, kaiming_*")
        tensor.mul_(gain)


class _InitSettings:
    """EDM's per-layer init arguments, kept on the layer so that ``reset_parameters()`` can redo them."""

    init_mode: str
    init_weight: float
    init_bias: float

    def _init_params(self, fan_in: int, fan_out: int) -> None:
        weight: torch.Tensor | None = getattr(self, "weight", None)
        bias: torch.Tensor | None = getattr(self, "bias", None)
        if weight is not None:
            _draw_init(weight, self.init_mode, fan_in, fan_out, self.init_weight)
        if bias is not None:
            _draw_init(bias, self.init_mode, fan_in, fan_out, self.init_bias)


# ---------------------------------------------------------------------------------------------------------------------
# Layers.


class Linear(_InitSettings, nn.Linear):
    """A fully connected layer, ``x W^T + b``, weight ``[out, in]``; the bias is added after the product, as in EDM."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.init_mode, self.init_weight, self.init_bias = init_mode, init_weight, init_bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "init_mode"):
            return  # called by nn.Linear.__init__ before the settings exist; __init__ calls it again
        self._init_params(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y.add_(self.bias.to(x.dtype))  # y is a fresh tensor: adding in place saves a copy
        return y


def _add_channel_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # EDM adds the bias after the convolution rather than inside it; the two differ by ~1e-6, so keep EDM's order.
    if bias is None:
        return y
    return y.add_(bias.to(y.dtype).reshape(1, -1, 1, 1))


class Conv2d(_InitSettings, nn.Conv2d):
    """A convolution without resampling, 'same' padding (``kernel // 2``) by default: EDM's ``Conv2d`` when it has
    neither ``up`` nor ``down``. The bias is added after the convolution, as in EDM.

    It is a ``torch.nn.Conv2d`` so that peft's LoRA can wrap it, and its positional arguments are ``nn.Conv2d``'s
    (``stride, padding, dilation, groups, bias``) because peft builds its LoRA factors as
    ``type(base)(in, r, kernel_size, stride, padding, bias=False)``. EDM's ``Conv2d(..., bias, up, down, ...)`` argument
    list is ``make_conv2d``'s, which picks this class or ``ResampleConv2d``. EDM's init arguments are keyword-only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        size = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        if min(size) < 1:
            raise ValueError("a plain Conv2d needs kernel >= 1; a pure resample is a ResampleConv2d with kernel 0")
        if padding is None:
            padding = (size[0] // 2, size[1] // 2)
        super().__init__(in_channels, out_channels, size, stride, padding, dilation, groups, bias)
        self.init_mode, self.init_weight, self.init_bias = init_mode, init_weight, init_bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "init_mode"):
            return  # called by nn.Conv2d.__init__ before the settings exist; __init__ calls it again
        area = self.kernel_size[0] * self.kernel_size[1]
        self._init_params(self.in_channels // self.groups * area, self.out_channels * area)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)
        return _add_channel_bias(y, self.bias)


def resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The separable 2-D resampling filter ``outer(f, f) / sum(f)^2``, shaped ``[1, 1, L, L]`` (unit DC gain)."""
    f = torch.as_tensor(taps, dtype=torch.get_default_dtype())  # exact binary fractions in any float type
    return f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()


def _depthwise(filt: torch.Tensor, channels: int) -> torch.Tensor:
    # One copy of the filter per channel, for a grouped (per-channel) convolution.
    return filt.tile([channels, 1, 1, 1])


def _upsample2x(x: torch.Tensor, filt: torch.Tensor, padding: int) -> torch.Tensor:
    # Zero-insertion upsampling keeps one sample in four, so the filter is scaled by 4 to keep the mean.
    channels = x.shape[1]
    return F.conv_transpose2d(x, _depthwise(filt.mul(4), channels), groups=channels, stride=2, padding=padding)


def _downsample2x(x: torch.Tensor, filt: torch.Tensor, padding: int) -> torch.Tensor:
    channels = x.shape[1]
    return F.conv2d(x, _depthwise(filt, channels), groups=channels, stride=2, padding=padding)


class ResampleConv2d(_InitSettings, nn.Module):
    """EDM's ``Conv2d`` with ``up=True`` or ``down=True``: a 2x FIR resample, then an optional ``kernel`` convolution.

    The resample filter is the buffer ``resample_filter`` (see ``resample_kernel``). ``kernel=0`` resamples only and
    has no weight or bias. ``fused_resample=True`` swaps the order so that the convolution runs at the high
    resolution and one padding covers both (NCSN++'s ``aux_residual`` uses it when downsampling).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        if up == down:
            raise ValueError("a ResampleConv2d goes either up or down (exactly one of up=, down=)")
        if kernel == 0 and in_channels != out_channels:
            raise ValueError("kernel=0 resamples only, so in_channels must equal out_channels")
        super().__init__()
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.init_mode, self.init_weight, self.init_bias = init_mode, init_weight, init_bias
        has_weight = kernel > 0
        weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if has_weight else None
        self.register_parameter("weight", weight)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels)) if has_weight and bias else None)
        self.register_buffer("resample_filter", resample_kernel(resample_filter))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        area = self.kernel * self.kernel
        self._init_params(self.in_channels * area, self.out_channels * area)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        filt = self.resample_filter.to(x.dtype)
        f_pad = (filt.shape[-1] - 1) // 2
        if self.weight is None:
            return _upsample2x(x, filt, f_pad) if self.up else _downsample2x(x, filt, f_pad)
        w = self.weight.to(x.dtype)
        w_pad = w.shape[-1] // 2
        if self.fused_resample and self.up:
            # Upsample with the combined padding, then convolve without any.
            x = F.conv2d(_upsample2x(x, filt, w_pad + f_pad), w)
        elif self.fused_resample:
            # Convolve with the combined padding at full resolution, then filter and subsample without any.
            x = _downsample2x(F.conv2d(x, w, padding=w_pad + f_pad), filt, 0)
        else:
            x = _upsample2x(x, filt, f_pad) if self.up else _downsample2x(x, filt, f_pad)
            x = F.conv2d(x, w, padding=w_pad)
        return _add_channel_bias(x, self.bias)


def make_conv2d(
    in_channels: int,
    out_channels: int,
    kernel: int,
    bias: bool = True,
    up: bool = False,
    down: bool = False,
    resample_filter: Sequence[float] = (1, 1),
    fused_resample: bool = False,
    **init: Any,
) -> Conv2d | ResampleConv2d:
    """EDM's ``Conv2d(...)`` argument list, built as a ``Conv2d`` (no resampling) or a ``ResampleConv2d``."""
    if up or down:
        return ResampleConv2d(
            in_channels, out_channels, kernel, bias, up, down, resample_filter, fused_resample, **init
        )
    return Conv2d(in_channels, out_channels, kernel, bias=bias, **init)


class GroupNorm(nn.GroupNorm):
    """Group normalisation with EDM's group count ``min(num_groups, num_channels // min_channels_per_group)``.

    Narrow layers get fewer groups, so that every group has at least ``min_channels_per_group`` channels.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__(min(num_groups, num_channels // min_channels_per_group), num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoids of the noise label: ``[cos(x·w_i), sin(x·w_i)]``.

    ``w_i = (1/max_positions)^(i / (C/2 - endpoint))`` for ``i < C/2``: with ``endpoint=True`` (DDPM++) the lowest
    frequency is exactly ``1/max_positions``. No parameters or buffers.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** exponents
        angles = x.ger(freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++): ``[cos(2π x·f_i), sin(2π x·f_i)]``.

    The frequencies ``f ~ N(0, scale²)`` are the buffer ``freqs`` (``C/2`` values); they are part of a trained
    network, so they must come from its checkpoint, never be drawn again.
    """

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.num_channels, self.scale = num_channels, scale
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.ger((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax_k(q^T k / sqrt(c))`` for ``q, k`` of shape ``[batch·heads, c, tokens]`` -> ``[batch·heads, q, k]``.

    As in EDM: ``k`` is scaled in the model's dtype, the product and softmax run in float32 (half precision would
    overflow or lose the small weights; float64 stays float64), and the weights come back in the model's dtype.
    """
    scaled_k = k / math.sqrt(k.shape[1])
    work = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("ncq,nck->nqk", q.to(work), scaled_k.to(work))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """The residual block shared by DDPM++, NCSN++ and ADM, with optional 2x resampling and self-attention.

    Residual branch: ``conv0(silu(norm0(x)))`` (resampling inside ``conv0``), then the embedding enters either as
    ``silu(norm1(h) * (scale + 1) + shift)`` (``adaptive_scale``, ADM) or ``silu(norm1(h + affine(emb)))``, then
    dropout and ``conv1``. The shortcut is ``skip(x)`` when the shape changes (a 1x1 convolution if the channels change
    or ``resample_proj``, else a pure resample), the identity otherwise. Attention, if any, is a residual too; both
    sums are multiplied by ``skip_scale``.

    The qkv convolution's output channels are laid out ``[head][channel][q|k|v]``: channel ``3·(h·c_head + i) + j``
    is component ``j`` (0 = q, 1 = k, 2 = v) of channel ``i`` of head ``h``. Checkpoints depend on this layout.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: InitKwargs | None = None,
        init_zero: InitKwargs | None = None,
        init_attn: InitKwargs | None = None,
    ):
        super().__init__()
        init = {} if init is None else init
        init_zero = {"init_weight": 0} if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:  # None means "as many 64-channel heads as fit" (ADM); too narrow a layer then gets no attention at all
            self.num_heads = out_channels // channels_per_head if num_heads is None else num_heads
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        # Registration order fixes the state-dict order: norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj.
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = make_conv2d(in_channels, out_channels, 3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip: nn.Module | None = None
        if out_channels != in_channels or up or down:
            # Same width: a weight-free resample suffices unless the architecture asks for a projection.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = make_conv2d(in_channels, out_channels, kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, emb)
        return self._attention(x) if self.num_heads else x

    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)  # emb may have batch 1: it broadcasts
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h.add_(x if self.skip is None else self.skip(x))
        return h * self.skip_scale

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, height * width)
        q, k, v = qkv.unbind(2)  # the [head][channel][q|k|v] layout, see the class docstring
        mixed = torch.einsum("nqk,nck->ncq", attention_weights(q, k), v)
        return self.proj(mixed.reshape(n, c, height, width)).add_(x) * self.skip_scale


# ---------------------------------------------------------------------------------------------------------------------
# Networks.


@dataclass(frozen=True)
class _Slot:
    """One main-path module of the U-Net: its ``enc``/``dec`` key, widths and place."""

    name: str  # e.g. "16x16_block2"
    kind: str  # "conv" (stem), "down", "block", "in0", "in1" (bottom of the decoder), "up"
    cin: int
    cout: int
    level: int  # 0 at full resolution
    res: int
    index: int = 0  # the block's number within its level


def _unet_layout(
    img_resolution: int, in_channels: int, stem_width: int, widths: Sequence[int], num_blocks: int
) -> tuple[list[_Slot], list[_Slot]]:
    """The encoder and decoder slots shared by SongUNet and DhariwalUNet, in EDM's order.

    Encoder, per level: the stem convolution (level 0) or a downsampling block, then ``num_blocks`` blocks. Every
    encoder output is kept as a skip. Decoder, from the bottom up: ``in0``/``in1`` (bottom) or an upsampling block,
    then ``num_blocks + 1`` blocks, each taking the last unused skip concatenated to its input.
    """
    enc: list[_Slot] = []
    cout = in_channels
    for level, width in enumerate(widths):
        res = img_resolution >> level
        if level == 0:
            enc.append(_Slot(f"{res}x{res}_conv", "conv", cout, stem_width, level, res))
            cout = stem_width
        else:
            enc.append(_Slot(f"{res}x{res}_down", "down", cout, cout, level, res))
        for idx in range(num_blocks):
            enc.append(_Slot(f"{res}x{res}_block{idx}", "block", cout, width, level, res, idx))
            cout = width

    skip_widths = [slot.cout for slot in enc]
    dec: list[_Slot] = []
    for level in reversed(range(len(widths))):
        res = img_resolution >> level
        if level == len(widths) - 1:
            dec.append(_Slot(f"{res}x{res}_in0", "in0", cout, cout, level, res))
            dec.append(_Slot(f"{res}x{res}_in1", "in1", cout, cout, level, res))
        else:
            dec.append(_Slot(f"{res}x{res}_up", "up", cout, cout, level, res))
        for idx in range(num_blocks + 1):
            cin = cout + skip_widths.pop()
            cout = widths[level]
            dec.append(_Slot(f"{res}x{res}_block{idx}", "block", cin, cout, level, res, idx))
    return enc, dec


def _role(name: str) -> str:
    """The part of an ``enc``/``dec`` key after its resolution: ``'16x16_aux_down'`` -> ``'aux_down'``."""
    return name.split("_", 1)[1]


def _check_choice(arg: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg}='{value}' is not one of {', '.join(choices)}")


def _class_embedding_input(
    class_labels: torch.Tensor | None, dropout: float, training: bool, batch: int
) -> torch.Tensor:
    """The label vectors (one-hot, or zeros for "no class"), with classifier-free-guidance label dropout in training."""
    if class_labels is None:
        raise ValueError("this network is class-conditional (label_dim > 0): pass class_labels (one-hot or zeros)")
    if not (training and dropout):
        return class_labels
    keep = torch.rand([batch, 1], device=class_labels.device) >= dropout  # drop whole samples' labels
    return class_labels * keep.to(class_labels.dtype)


def _join_skip(x: torch.Tensor, block: UNetBlock, skips: list[torch.Tensor]) -> torch.Tensor:
    # A decoder block whose input is wider than x expects the most recent unused skip, concatenated after x.
    if x.shape[1] != block.in_channels:
        x = torch.cat([x, skips.pop()], dim=1)
    return x


class SongUNet(nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021) as EDM re-implements them, with EDM's arguments and defaults.

    DDPM++: ``embedding_type='positional'``, ``channel_mult_noise=1``, ``encoder_type='standard'``,
    ``resample_filter=[1,1]``. NCSN++: ``'fourier'``, ``2``, ``'residual'``, ``[1,3,3,1]``. EDM's presets use
    ``decoder_type='standard'`` for both; ``'skip'`` (and ``encoder_type='skip'``) are supported too.

    Blocks: one attention head, ``skip_scale = sqrt(1/2)``, GroupNorm eps 1e-6, a 1x1 projection in resampling
    shortcuts, the embedding added before ``norm1``. Attention in the encoder's blocks at ``attn_resolutions``, in the
    decoder's ``in0`` and in the last block of each such level. The output is the ``{res}x{res}_aux_conv`` head (summed
    over levels, each upsampled, for the skip decoder).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init: InitKwargs = dict(init_mode="xavier_uniform")
        init_zero: InitKwargs = dict(init_mode="xavier_uniform", init_weight=1e-5)
        block_kwargs: dict[str, Any] = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)),
        )

        # Mapping network, registered in EDM's order (it is the state-dict order).
        if embedding_type == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # The stem is model_channels wide whatever channel_mult[0] is (CIFAR-10's DDPM++ has channel_mult [2,2,2]).
        widths = [model_channels * mult for mult in channel_mult]
        enc_slots, dec_slots = _unet_layout(img_resolution, in_channels, model_channels, widths, num_blocks)
        self.enc = nn.ModuleDict()
        aux_width = in_channels  # width of the encoder's auxiliary (image) path
        for slot in enc_slots:
            if slot.kind == "conv":
                self.enc[slot.name] = Conv2d(slot.cin, slot.cout, 3, **init)
                continue
            attention = slot.kind == "block" and slot.res in attn_resolutions
            self.enc[slot.name] = UNetBlock(
                slot.cin, slot.cout, down=slot.kind == "down", attention=attention, **block_kwargs
            )
            if slot.kind == "down":
                aux_width = self._add_encoder_aux(slot, encoder_type, aux_width, resample_filter, init)

        self.dec = nn.ModuleDict()
        for slot in dec_slots:
            last_of_level = slot.kind == "block" and slot.index == num_blocks
            attention = slot.kind == "in0" or (last_of_level and slot.res in attn_resolutions)
            self.dec[slot.name] = UNetBlock(
                slot.cin, slot.cout, up=slot.kind == "up", attention=attention, **block_kwargs
            )
            if last_of_level and (decoder_type == "skip" or slot.level == 0):
                upsample = decoder_type == "skip" and slot.level < len(widths) - 1
                self._add_output_head(slot, upsample, resample_filter, init_zero)

    def _add_encoder_aux(
        self, slot: _Slot, encoder_type: str, aux_width: int, taps: Sequence[float], init: InitKwargs
    ) -> int:
        """Add the auxiliary path's modules after a downsampling block; returns the path's new width."""
        prefix = f"{slot.res}x{slot.res}"
        if encoder_type == "skip":
            # The input image, downsampled alongside the main path, is projected and added to it.
            self.enc[f"{prefix}_aux_down"] = ResampleConv2d(aux_width, aux_width, 0, down=True, resample_filter=taps)
            self.enc[f"{prefix}_aux_skip"] = Conv2d(aux_width, slot.cout, 1, **init)
        elif encoder_type == "residual":
            # A second, progressively downsampled path, averaged into the main path at every level.
            self.enc[f"{prefix}_aux_residual"] = ResampleConv2d(
                aux_width, slot.cout, 3, down=True, resample_filter=taps, fused_resample=True, **init
            )
            return slot.cout
        return aux_width

    def _add_output_head(self, slot: _Slot, upsample: bool, taps: Sequence[float], init_zero: InitKwargs) -> None:
        prefix = f"{slot.res}x{slot.res}"
        if upsample:  # the skip decoder carries the lower levels' image up to this one
            self.dec[f"{prefix}_aux_up"] = ResampleConv2d(
                self.out_channels, self.out_channels, 0, up=True, resample_filter=taps
            )
        self.dec[f"{prefix}_aux_norm"] = GroupNorm(slot.cout, eps=1e-6)
        self.dec[f"{prefix}_aux_conv"] = Conv2d(slot.cout, self.out_channels, 3, **init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])
        x, skips = self._encode(x, emb)
        return self._decode(x, emb, skips)

    def _embed(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
        batch: int,
    ) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        cos_half, sin_half = emb.chunk(2, dim=1)
        emb = torch.cat([sin_half, cos_half], dim=1)  # score_sde's order is [sin, cos]; the checkpoints depend on it
        if self.map_label is not None:
            labels = _class_embedding_input(class_labels, self.label_dropout, self.training, batch)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips: list[torch.Tensor] = []
        aux = x
        for name, layer in self.enc.items():
            role = _role(name)
            if role == "aux_down":
                aux = layer(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + layer(aux)  # replaces the downsampling block's skip
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)  # the average keeps unit variance
            else:
                x = layer(x) if role == "conv" else layer(x, emb)
                skips.append(x)
        return x, skips

    def _decode(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor | None = None  # the image being assembled by the output head(s)
        head_in: torch.Tensor | None = None
        for name, layer in self.dec.items():
            role = _role(name)
            if role == "aux_up":
                out = layer(out)
            elif role == "aux_norm":
                head_in = layer(x)
            elif role == "aux_conv":
                level_out = layer(F.silu(head_in))
                out = level_out if out is None else level_out + out
            else:
                x = layer(_join_skip(x, layer, skips), emb)
        assert out is not None  # level 0 always has a head
        return out


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as EDM re-implements it, with EDM's arguments and defaults.

    Blocks: adaptive GroupNorm ``norm1(h) * (scale + 1) + shift``, ``skip_scale`` 1, eps 1e-5, 64 channels per
    attention head, weight-free shortcuts for same-width resampling. Attention in every block at
    ``attn_resolutions`` and in the decoder's ``in0``. The class embedding is bias-free and added after
    ``map_layer1``, without scaling. Output: ``out_conv(silu(out_norm(x)))``.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        init: InitKwargs = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero: InitKwargs = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs: dict[str, Any] = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping network, registered in EDM's order (it is the state-dict order): the label projection comes last.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
            if label_dim
            else None
        )

        widths = [model_channels * mult for mult in channel_mult]
        enc_slots, dec_slots = _unet_layout(img_resolution, in_channels, widths[0], widths, num_blocks)
        self.enc = nn.ModuleDict()
        for slot in enc_slots:
            if slot.kind == "conv":
                self.enc[slot.name] = Conv2d(slot.cin, slot.cout, 3, **init)
            else:
                attention = slot.kind == "block" and slot.res in attn_resolutions
                self.enc[slot.name] = UNetBlock(
                    slot.cin, slot.cout, down=slot.kind == "down", attention=attention, **block_kwargs
                )
        self.dec = nn.ModuleDict()
        for slot in dec_slots:
            attention = slot.kind == "in0" or (slot.kind == "block" and slot.res in attn_resolutions)
            self.dec[slot.name] = UNetBlock(
                slot.cin, slot.cout, up=slot.kind == "up", attention=attention, **block_kwargs
            )
        self.out_norm = GroupNorm(widths[0])
        self.out_conv = Conv2d(widths[0], out_channels, 3, **init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])
        skips: list[torch.Tensor] = []
        for name, layer in self.enc.items():
            x = layer(x) if _role(name) == "conv" else layer(x, emb)
            skips.append(x)
        for layer in self.dec.values():
            x = layer(_join_skip(x, layer, skips), emb)
        return self.out_conv(F.silu(self.out_norm(x)))

    def _embed(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
        batch: int,
    ) -> torch.Tensor:
        emb = self.map_noise(noise_labels)  # [cos, sin], no swap (unlike SongUNet)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_class_embedding_input(class_labels, self.label_dropout, self.training, batch))
        return F.silu(emb)


NETWORKS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
