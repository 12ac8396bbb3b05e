"""EDM2's magnitude-preserving U-Net: its helpers and layers against their formulas, computed here independently in
float64; the checkpoint's key names and order; EDM2-S's size; fp16 checkpoints; autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from disback.diffusion.networks.edm2 import (
    Block,
    MPConv,
    MPFourier,
    UNet,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)
from disback.diffusion.preconditioners import Precond

EPS = 1e-4
TINY = dict(
    img_resolution=8,
    img_channels=2,
    label_dim=3,
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=4,
)


# ---------------------------------------------------------------------------------------------------------------------
# Independent float64 references, written from the formulas.


def ref_normalize(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    x = x.double()
    count = math.prod(x.shape[d] for d in dims)
    rms = x.square().sum(dim=dims, keepdim=True).sqrt() / math.sqrt(count)
    return x / (EPS + rms)


def ref_weight(w: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """normalize(W) per output channel, times gain / sqrt(fan_in)."""
    fan_in = w[0].numel()
    return ref_normalize(w, tuple(range(1, w.ndim))) * float(gain) / math.sqrt(fan_in)


def ref_mpconv(layer: MPConv, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    w = ref_weight(layer.weight.detach(), gain)
    return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


def ref_silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x) / 0.596


def ref_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def ref_cat(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * c * (1 - t) / math.sqrt(na), b * c * t / math.sqrt(nb)], dim=1)


def ref_resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """With the default filter [1, 1]: 2x2 box average down, pixel replication up."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return x


def ref_attention(block: Block, x: torch.Tensor) -> torch.Tensor:
    qkv = ref_mpconv(block.attn_qkv, x)
    n, _, h, w = qkv.shape
    heads = block.num_heads
    c = block.out_channels // heads
    # channel (head, c, q|k|v) sits at index (head * c + c_i) * 3 + which
    q, k, v = (qkv[:, which::3].reshape(n, heads, c, h * w) for which in range(3))
    q, k, v = (ref_normalize(t, (2,)) for t in (q, k, v))
    logits = torch.einsum("nhci,nhcj->nhij", q, k) / math.sqrt(c)
    weights = logits.softmax(dim=-1)
    out = torch.einsum("nhij,nhcj->nhci", weights, v).reshape(n, heads * c, h, w)
    return ref_mpconv(block.attn_proj, out)


def ref_block(block: Block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    x = ref_resample(x.double(), block.resample_mode)
    emb = emb.double()
    if block.flavor == "enc":
        if block.conv_skip is not None:
            x = ref_mpconv(block.conv_skip, x)
        x = ref_normalize(x, (1,))
    y = ref_mpconv(block.conv_res0, ref_silu(x))
    scale = ref_mpconv(block.emb_linear, emb, gain=block.emb_gain.item()) + 1
    y = ref_mpconv(block.conv_res1, ref_silu(y * scale[:, :, None, None]))
    if block.flavor == "dec" and block.conv_skip is not None:
        x = ref_mpconv(block.conv_skip, x)
    x = ref_sum(x, y, block.res_balance)
    if block.num_heads:
        x = ref_sum(x, ref_attention(block, x), block.attn_balance)
    return x.clamp(-block.clip_act, block.clip_act) if block.clip_act is not None else x


def ref_unet(net: UNet, x: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    freqs, phases = net.emb_fourier.freqs.double(), net.emb_fourier.phases.double()
    fourier = math.sqrt(2) * torch.cos(noise.double()[:, None] * freqs[None] + phases[None])
    emb = ref_mpconv(net.emb_noise, fourier)
    emb = ref_sum(emb, ref_mpconv(net.emb_label, labels.double() * math.sqrt(labels.shape[1])), 0.5)
    emb = ref_silu(emb)
    x = torch.cat([x.double(), torch.ones_like(x[:, :1]).double()], dim=1)
    skips = []
    for layer in net.enc.values():
        x = ref_mpconv(layer, x) if isinstance(layer, MPConv) else ref_block(layer, x, emb)
        skips.append(x)
    for name, block in net.dec.items():
        if "block" in name:
            x = ref_cat(x, skips.pop(), 0.5)
        x = ref_block(block, x, emb)
    return ref_mpconv(net.out_conv, x, gain=net.out_gain.item())


def randomize_gains(net: nn.Module, seed: int = 0) -> None:
    """Non-zero learned gains (they start at 0, which would hide the embedding and the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5 + torch.rand((), generator=gen).item())


# ---------------------------------------------------------------------------------------------------------------------
# Helpers.


def test_normalize_matches_formula_and_gives_unit_rms():
    x = torch.randn(4, 3, 5, 5) * 3
    torch.testing.assert_close(normalize(x).double(), ref_normalize(x, (1, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalize(x, dim=1).double(), ref_normalize(x, (1,)), rtol=1e-6, atol=1e-6)
    rms = normalize(x).square().mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.ones(4), rtol=1e-3, atol=0)
    assert normalize(x.half()).dtype == torch.float16  # the norm is taken in float32, the result keeps x's dtype


def test_mp_silu_sum_cat_match_formulas():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    tol = dict(rtol=1e-6, atol=1e-6)  # float32 against float64
    torch.testing.assert_close(mp_silu(a).double(), ref_silu(a.double()), **tol)
    torch.testing.assert_close(
        mp_sum(a, a.flip(0), t=0.3).double(), ref_sum(a.double(), a.flip(0).double(), 0.3), **tol
    )
    torch.testing.assert_close(mp_cat(a, b, t=0.3).double(), ref_cat(a.double(), b.double(), 0.3), **tol)


def test_mp_sum_and_mp_cat_preserve_magnitude():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 48, 16, 16, generator=gen), torch.randn(64, 16, 16, 16, generator=gen)
    for t in (0.3, 0.5, 0.8):
        s = mp_sum(a, torch.randn(a.shape, generator=gen), t=t)
        assert s.square().mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
        c = mp_cat(a, b, t=t)
        assert c.square().mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
        # the energy splits (1 - t)^2 : t^2 between the two parts, whatever their channel counts
        share_b = c[:, 48:].square().sum() / c.square().sum()
        assert share_b.item() == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=0.01)


def test_resample_with_the_default_filter_is_box_down_and_replicate_up():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(resample(x, mode="down"), F.avg_pool2d(x, 2))
    torch.testing.assert_close(resample(x, mode="up"), ref_resample(x, "up"))
    assert resample(x, mode="keep") is x
    assert resample(x, f=[1, 3, 3, 1], mode="down").shape == (2, 3, 4, 4)
    assert resample(x, f=[1, 3, 3, 1], mode="up").shape == (2, 3, 16, 16)


def test_mp_fourier_is_scaled_cosine_of_stored_frequencies_and_phases():
    layer = MPFourier(16)
    assert [name for name, _ in layer.named_buffers()] == ["freqs", "phases"]
    x = torch.randn(5)
    expected = math.sqrt(2) * torch.cos(x.double()[:, None] * layer.freqs.double() + layer.phases.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Layers.


def test_mpconv_normalizes_its_weight_at_every_call():
    linear, conv = MPConv(6, 4, kernel=[]), MPConv(3, 5, kernel=[3, 3])
    with torch.no_grad():
        linear.weight.mul_(7.0)  # stored weights need not have unit norm (post-hoc EMA)
    x, img = torch.randn(2, 6), torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(linear(x, gain=0.7).double(), ref_mpconv(linear, x.double(), 0.7), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv(img).double(), ref_mpconv(conv, img.double()), rtol=1e-5, atol=1e-5)
    assert list(linear.state_dict()) == ["weight"]  # no bias


def test_mpconv_forces_weight_norm_in_training_only_for_trainable_weights():
    layer = MPConv(6, 4, kernel=[])
    with torch.no_grad():
        layer.weight.mul_(3.0)
    stored = layer.weight.detach().clone()
    layer.eval()(torch.randn(2, 6))
    torch.testing.assert_close(layer.weight.detach(), stored)  # inference leaves the weights alone
    layer.train().requires_grad_(False)(torch.randn(2, 6))
    torch.testing.assert_close(layer.weight.detach(), stored)  # so does training a frozen copy
    layer.requires_grad_(True)(torch.randn(2, 6)).sum().backward()
    torch.testing.assert_close(layer.weight.detach().double(), ref_normalize(stored, (1,)), rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is not None


def test_mpconv_is_not_a_torch_linear_or_conv():
    """peft's LoRA adapts nn.Linear / nn.Conv2d: it must not wrap MPConv, whose weight is re-normalised."""
    net = UNet(**TINY)
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in net.modules())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=8, out_channels=8, flavor="enc", resample_mode="down"),
        dict(in_channels=8, out_channels=16, flavor="enc", attention=True, channels_per_head=4),
        dict(in_channels=24, out_channels=8, flavor="dec", attention=True, channels_per_head=4),
        dict(in_channels=8, out_channels=8, flavor="dec", resample_mode="up"),
        dict(in_channels=8, out_channels=8, flavor="dec", clip_act=0.5),
    ],
)
def test_block_matches_step_by_step_computation(kwargs):
    torch.manual_seed(0)
    block = Block(emb_channels=12, **kwargs).eval()
    randomize_gains(block)
    x, emb = torch.randn(2, kwargs["in_channels"], 8, 8) * 2, torch.randn(2, 12)
    out = block(x, emb)
    torch.testing.assert_close(out.double(), ref_block(block, x, emb), rtol=1e-4, atol=2e-5)
    if "clip_act" in kwargs:
        assert out.abs().max().item() == pytest.approx(0.5)


def test_block_parameters_follow_the_checkpoint_layout():
    enc = Block(8, 16, 12, flavor="enc", attention=True, channels_per_head=4)
    assert list(enc.state_dict()) == [
        "emb_gain",
        "conv_res0.weight",
        "emb_linear.weight",
        "conv_res1.weight",
        "conv_skip.weight",
        "attn_qkv.weight",
        "attn_proj.weight",
    ]
    assert enc.conv_res0.weight.shape == (16, 16, 3, 3)  # enc: the skip conv maps the channels first
    dec = Block(24, 8, 12, flavor="dec")
    assert dec.conv_res0.weight.shape == (8, 24, 3, 3) and dec.num_heads == 0
    assert enc.num_heads == 4 and enc.emb_gain.shape == ()


# ---------------------------------------------------------------------------------------------------------------------
# The network.


def expected_unet_keys(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks, attn):
    """The checkpoint's keys, from EDM2's rules: own parameters first (out_gain; emb_gain in a block), then the
    children in registration order; conv_skip iff the width changes, attention where asked and in in0."""

    def block(name, cin, cout, attention):
        keys = [f"{name}.{k}" for k in ("emb_gain", "conv_res0.weight", "emb_linear.weight", "conv_res1.weight")]
        keys += [f"{name}.conv_skip.weight"] if cin != cout else []
        keys += [f"{name}.attn_qkv.weight", f"{name}.attn_proj.weight"] if attention else []
        return keys

    keys = ["out_gain", "emb_fourier.freqs", "emb_fourier.phases", "emb_noise.weight"]
    keys += ["emb_label.weight"] if label_dim else []
    widths = [model_channels * m for m in channel_mult]
    skips, cout = [], img_channels + 1
    for level, width in enumerate(widths):
        res = img_resolution >> level
        if level == 0:
            keys.append(f"enc.{res}x{res}_conv.weight")
            cout = width
        else:
            keys += block(f"enc.{res}x{res}_down", cout, cout, False)  # keeps the previous level's width
        skips.append(cout)
        for i in range(num_blocks):
            keys += block(f"enc.{res}x{res}_block{i}", cout, width, res in attn)
            cout = width
            skips.append(cout)
    for level in reversed(range(len(widths))):
        res, width = img_resolution >> level, widths[level]
        if level == len(widths) - 1:
            keys += block(f"dec.{res}x{res}_in0", cout, cout, True) + block(f"dec.{res}x{res}_in1", cout, cout, False)
        else:
            keys += block(f"dec.{res}x{res}_up", cout, cout, False)
        for i in range(num_blocks + 1):
            keys += block(f"dec.{res}x{res}_block{i}", cout + skips.pop(), width, res in attn)
            cout = width
    return keys + ["out_conv.weight"]


def test_unet_keys_and_order_follow_the_rules():
    net = UNet(**TINY)
    expected = expected_unet_keys(8, 2, 3, 8, [1, 2], 1, {4})
    assert list(net.state_dict()) == expected
    assert net.enc["8x8_conv"].weight.shape == (8, 3, 3, 3)  # image channels + the constant ones channel
    uncond = UNet(**{**TINY, "label_dim": 0, "num_blocks": 2})
    assert list(uncond.state_dict()) == expected_unet_keys(8, 2, 0, 8, [1, 2], 2, {4})


def test_unet_forward_matches_step_by_step_computation():
    torch.manual_seed(1)
    net = UNet(**TINY).eval()
    randomize_gains(net)
    x, noise = torch.randn(3, 2, 8, 8), torch.randn(3)
    labels = F.one_hot(torch.tensor([0, 2, 1]), 3).float()
    torch.testing.assert_close(net(x, noise, labels).double(), ref_unet(net, x, noise, labels), rtol=1e-4, atol=2e-5)


def test_edm2_s_has_the_published_size():
    """EDM2-S (img64): 280,209,381 = the Precond's parameters, logvar_linear's 128 included, buffers (640 random
    Fourier frequencies and phases) not; 203 state-dict keys."""
    with torch.device("meta"):
        net = Precond(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192)
    assert sum(p.numel() for p in net.parameters()) == 280_209_381
    assert sum(p.numel() for p in net.logvar_linear.parameters()) == 128
    assert sum(b.numel() for b in net.buffers()) == 640
    keys = list(net.state_dict())
    assert len(keys) == 203
    assert keys[:5] == [
        "unet.out_gain",
        "unet.emb_fourier.freqs",
        "unet.emb_fourier.phases",
        "unet.emb_noise.weight",
        "unet.emb_label.weight",
    ]
    assert keys[5] == "unet.enc.64x64_conv.weight"
    assert keys[-4:] == [
        "unet.out_conv.weight",
        "logvar_fourier.freqs",
        "logvar_fourier.phases",
        "logvar_linear.weight",
    ]


def test_fp16_checkpoint_weights_in_an_fp32_network():
    """EDM2 pickles hold float16 tensors. Loaded into a float32 network, they give what the float16 network gives
    upcast (exactly), and what the float16 network itself gives on float32 input (up to the float16 rounding of
    its scalar gains, which EDM2 applies in the gains' dtype)."""
    torch.manual_seed(2)
    net = Precond(**TINY).eval()
    randomize_gains(net)
    net16 = copy.deepcopy(net).half()
    fp32 = Precond(**TINY).eval()
    fp32.load_state_dict(net16.state_dict())
    assert all(t.dtype == torch.float32 for t in fp32.state_dict().values())
    x, sigma, labels = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 5.0]), torch.tensor([1, 2])
    out = fp32(x, sigma, labels)
    torch.testing.assert_close(out, copy.deepcopy(net16).float()(x, sigma, labels), rtol=0, atol=0)
    torch.testing.assert_close(out, net16(x, sigma, labels), rtol=2e-3, atol=2e-3)


def test_bfloat16_autocast_gives_finite_outputs():
    torch.manual_seed(3)
    net = Precond(**TINY).eval()
    randomize_gains(net)
    x, sigma = torch.randn(2, 2, 8, 8) * 10, torch.tensor([0.002, 80.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logvar = net(x, sigma, torch.tensor([0, 1]), return_logvar=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(logvar).all()
    torch.testing.assert_close(out, net(x, sigma, torch.tensor([0, 1])), rtol=0.1, atol=0.1)


def test_float16_backbone_as_on_cuda_stays_close_to_float32():
    """EDM2 runs its UNet in float16 on CUDA (use_fp16, the default): the weights are normalised in float32 and cast,
    the embedding stays float32, attention runs in float16. Forced here on the CPU."""
    torch.manual_seed(4)
    net = Precond(**TINY).eval()
    randomize_gains(net)
    x, sigma, labels = torch.randn(2, 2, 8, 8), torch.tensor([0.05, 20.0]), torch.tensor([0, 2])
    ref = net(x, sigma, labels)
    net.model_dtype = lambda x, force_fp32=False: torch.float16
    out = net(x, sigma, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
