"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", config G, Fig. 21).

This is the backbone ``F_theta`` of NVIDIA's released EDM2 checkpoints (``edm2-img64-{xs,s,m,l,xl}-*.pkl``, read by
``disback.storage``); its preconditioner, ``Precond``, lives in ``disback.diffusion.preconditioners``. The aim is to
run those checkpoints, and networks distilled from them, with outputs equal to EDM2's. So:

- ``UNet``, ``Block``, ``MPConv`` and ``MPFourier`` take EDM2's constructor arguments, with EDM2's defaults, so that a
  snapshot's ``_init_kwargs`` pass straight in;
- ``state_dict()`` has exactly the checkpoint's keys in its order: a module's own parameters come before its children
  (``out_gain`` first in ``UNet``, ``emb_gain`` first in each ``Block``), then ``emb_fourier.{freqs,phases}``,
  ``emb_noise``, ``emb_label``, ``enc.*``, ``dec.*``, ``out_conv``; a layer EDM2 leaves out (``conv_skip`` when the
  width does not change, attention where there is none, ``emb_label`` when unconditional) is absent here too;
- every layer runs EDM2's sequence of floating-point operations (weights re-normalised in float32 at every call,
  attention softmax in the activations' dtype, ...), so that outputs agree to rounding.

What makes it magnitude-preserving: every weight is normalised at every forward pass (``MPConv``), activations go
through ``mp_silu`` (SiLU rescaled to unit magnitude), and branches meet through ``mp_sum`` / ``mp_cat`` (weighted so
that unit-magnitude inputs give a unit-magnitude result). The encoder additionally pixel-normalises its blocks'
inputs, attention pixel-normalises q, k and v, and activations are clipped to +-256. The stored weights need not have
unit norm (post-hoc EMA averages of unit-norm weights do not), which is why inference must re-normalise them.

Training: like EDM2, ``MPConv`` in training mode also writes the normalised weight back into its parameter ("forced
weight normalisation", the paper's Eq. 66). disback does this only for a weight that is trainable
(``requires_grad``): a frozen teacher left in training mode, or one whose tensors an adapter shares, keeps its
weights untouched.

LoRA: ``MPConv`` is deliberately not an ``nn.Linear`` / ``nn.Conv2d`` subclass. Its effective weight is
``normalize(W) * gain / sqrt(fan_in)``, so peft's additive LoRA (``B A x`` added after the layer's own product) would
bypass the normalisation and break magnitude preservation. peft therefore finds nothing to adapt in this network:
``network.lora_rank > 0`` (disback.method.lora) has no target layers in an EDM2 UNet and is refused with an error;
the fake score and the path nodes of an EDM2 teacher are full copies. Adapting EDM2 with LoRA would need the delta
added to ``W`` before the normalisation, inside ``MPConv`` (not implemented).

Sources: the facts in the team's reference notes on EDM/EDM2 checkpoints, checked in detail against the stored copy
of NVlabs/edm2 ``training/networks_edm2.py``. The code and text are disback's own (clean room); only public class and
argument names follow EDM2, because checkpoints depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Block", "MPConv", "MPFourier", "UNet", "mp_cat", "mp_silu", "mp_sum", "normalize", "resample"]


# ---------------------------------------------------------------------------------------------------------------------
# Magnitude-preserving operations.


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` scaled to unit root-mean-square magnitude over ``dim`` (default: all but the first).

    ``x / (eps + ||x|| * sqrt(n_norm / n_x))``, the norm taken in float32 whatever ``x``'s dtype; the ratio of element
    counts turns the norm into an RMS value, so a normalised vector of length K has norm sqrt(K).
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by 0.596, its output magnitude for unit-normal input (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``(1 - t) a + t b`` rescaled by ``1 / sqrt((1 - t)^2 + t^2)``, unit magnitude for unit, independent inputs
    (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation of ``a`` (Na channels) and ``b`` (Nb channels) along ``dim``, with ``b`` weighted by ``t``
    against ``a`` by ``1 - t`` and the whole kept at unit magnitude (Eq. 103):
    ``a * C (1 - t) / sqrt(Na)``, ``b * C t / sqrt(Nb)``, ``C = sqrt((Na + Nb) / ((1 - t)^2 + t^2))``."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    w_a = c / math.sqrt(n_a) * (1 - t)
    w_b = c / math.sqrt(n_b) * t
    return torch.cat([w_a * a, w_b * b], dim=dim)


def _resample_filter(taps: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """The separable 2-D filter ``outer(f, f) / sum(f)^2`` as ``[1, 1, k, k]``, built in float32, then in ``like``'s
    dtype and device."""
    f = torch.tensor(list(taps), dtype=torch.float32)
    f = f / f.sum()
    return torch.outer(f, f)[None, None].to(dtype=like.dtype, device=like.device)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """Downsample (``'down'``) or upsample (``'up'``) ``x`` by 2 with the separable filter ``f`` applied depthwise,
    or return it as is (``'keep'``). Upsampling is a strided transposed convolution with the filter times 4 (the
    filter sums to 1; each output pixel receives a quarter of the taps)."""
    if mode == "keep":
        return x
    if len(f) % 2 != 0:
        raise ValueError(f"the resampling filter needs an even number of taps, not {len(f)}")
    filt = _resample_filter(f, x)
    channels, pad = x.shape[1], (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, filt.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))
    if mode == "up":
        return F.conv_transpose2d(x, (filt * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))
    raise ValueError(f"unknown resample mode '{mode}'; available: keep, up, down")


# ---------------------------------------------------------------------------------------------------------------------
# Layers.


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features of a scalar per sample: ``sqrt(2) cos(x freqs + phases)`` (Eq. 75).

    ``freqs`` and ``phases`` are random buffers: a checkpoint supplies them, they are never redrawn.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving fully connected (``kernel=[]``) or 2-D convolution (``kernel=[k, k]``) layer, no bias.

    The weight ``[out, in, *kernel]`` is normalised per output channel in float32 at every call and scaled by
    ``gain / sqrt(fan_in)``, then cast to the input's dtype (Eq. 47). In training mode a trainable weight is also
    replaced by its normalised self (forced weight normalisation, Eq. 66). Not an ``nn.Linear`` / ``nn.Conv2d``
    subclass, on purpose: see the module docstring about LoRA.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain: float | torch.Tensor = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``normalize(W) * gain / sqrt(fan_in)`` in ``dtype`` (default float32), forcing the stored weight to unit
        norm first when training."""
        w = self.weight.to(torch.float32)
        if self.training and self.weight.requires_grad:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))
        return w.to(dtype or torch.float32)

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.effective_weight(gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"


def _attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention over pixels of ``qkv`` (``[N, heads * c * 3, H, W]``, channels laid out as
    ``[head][channel][q|k|v]``), with q, k, v pixel-normalised and no float32 upcast of the softmax; returns
    ``[N, heads * c, H, W]``."""
    n, _, h, w = qkv.shape
    y = qkv.reshape(n, num_heads, -1, 3, h * w)
    q, k, v = normalize(y, dim=2).unbind(3)
    weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    out = torch.einsum("nhqk,nhck->nhcq", weights, v)
    return out.reshape(n, -1, h, w)


class Block(nn.Module):
    """A U-Net block (Fig. 21): resampling, a residual branch modulated by the embedding, optional self-attention.

    ``flavor='enc'`` maps the channels with ``conv_skip`` *before* the residual branch and pixel-normalises the
    input; ``'dec'`` maps them only on the skip path, after the branch. ``emb_gain`` (a learned scalar, 0 at
    init) scales the embedding's modulation ``1 + emb_linear(emb)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"unknown block flavor '{flavor}'; available: enc, dec")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # Registration order is the checkpoint's key order.
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self._residual(x, emb)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            y = self.attn_proj(_attention(self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x

    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        return self.conv_res1(y)


# ---------------------------------------------------------------------------------------------------------------------
# The network.


class UNet(nn.Module):
    """EDM2's U-Net: ``forward(x, noise_labels, class_labels) -> F``, ``x`` of ``img_channels`` channels.

    Embedding: ``mp_silu(mp_sum(emb_noise(emb_fourier(c_noise)), emb_label(labels * sqrt(label_dim)), label_balance))``.
    The input gets a constant channel of ones. Encoder levels ``{res}x{res}_conv`` (level 0) or ``_down``, then
    ``_block{i}``; decoder ``_in0`` (attention) and ``_in1`` at the lowest resolution, ``_up`` elsewhere, then
    ``_block{i}`` for ``i <= num_blocks``, each fed ``mp_cat(x, skip)`` with the encoder's outputs popped last-first;
    output ``out_conv(x, gain=out_gain)``.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        **block_kwargs,
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        # Registration order is the checkpoint's key order.
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None
        attn = set(attn_resolutions)
        self.enc, cout = self._encoder(img_resolution, img_channels + 1, cblock, cemb, num_blocks, attn, block_kwargs)
        self.dec, cout = self._decoder(img_resolution, cout, cblock, cemb, num_blocks, attn, block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def _encoder(
        self, img_res: int, cin: int, cblock: list[int], cemb: int, num_blocks: int, attn: set[int], kw: dict
    ) -> tuple[nn.ModuleDict, int]:
        enc, cout = nn.ModuleDict(), cin
        for level, channels in enumerate(cblock):
            res = img_res >> level
            if level == 0:
                enc[f"{res}x{res}_conv"] = MPConv(cout, channels, kernel=[3, 3])
                cout = channels
            else:
                enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **kw)
            for idx in range(num_blocks):
                enc[f"{res}x{res}_block{idx}"] = Block(cout, channels, cemb, flavor="enc", attention=res in attn, **kw)
                cout = channels
        return enc, cout

    def _decoder(
        self, img_res: int, cout: int, cblock: list[int], cemb: int, num_blocks: int, attn: set[int], kw: dict
    ) -> tuple[nn.ModuleDict, int]:
        dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_res >> level
            if level == len(cblock) - 1:
                dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **kw)
                dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **kw)
            else:
                dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **kw)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                dec[f"{res}x{res}_block{idx}"] = Block(cin, channels, cemb, flavor="dec", attention=res in attn, **kw)
                cout = channels
        return dec, cout

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The per-sample embedding fed to every block (batch 1 broadcasts against batch N)."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels (one-hot, [N, label_dim])")
            label = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label, t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.embedding(noise_labels, class_labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, MPConv) else layer(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
