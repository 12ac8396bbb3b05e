"""disback's EDM networks (SongUNet, DhariwalUNet) against the rules of NVIDIA's EDM, checked independently.

The expected state-dict keys are generated here from the written rules (which module exists, in which order), not by
asking the module; each layer is compared with a direct computation (explicit convolutions, SDPA, formulas in
float64); the published configurations are counted on the ``meta`` device, so that no memory or time is spent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from disback.diffusion.networks.edm import (
    NETWORKS,
    Conv2d,
    DhariwalUNet,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    ResampleConv2d,
    SongUNet,
    UNetBlock,
    attention_weights,
    make_conv2d,
)

# ---------------------------------------------------------------------------------------------------------------------
# Expected keys, from the rules (EDM training/networks.py as written down in the team's EDM facts, section 2).

TINY_DDPMPP = dict(
    img_resolution=16, in_channels=3, out_channels=3, label_dim=4, augment_dim=9, model_channels=16,
    channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8], dropout=0.0,
)  # fmt: skip
TINY_NCSNPP = dict(
    img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
    attn_resolutions=[8], dropout=0.0, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
    decoder_type="skip", resample_filter=[1, 3, 3, 1],
)  # fmt: skip
TINY_SKIP_ENCODER = dict(TINY_NCSNPP, encoder_type="skip", decoder_type="standard", embedding_type="positional")
# 64 channels: ADM's heads are 64 channels wide, so a narrower network would have no attention at all.
TINY_ADM = dict(
    img_resolution=16, in_channels=3, out_channels=3, label_dim=5, model_channels=64, channel_mult=[1, 2],
    num_blocks=2, attn_resolutions=[8], dropout=0.0,
)  # fmt: skip


def _wb(prefix: str, bias: bool = True) -> list[str]:
    return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if bias else [])


def _expected_block(prefix: str, cin: int, cout: int, *, resample: bool, heads: int, proj: bool) -> list[str]:
    """A UNetBlock: norm0, conv0 (+ filter when resampling), affine, norm1, conv1, skip, then attention's three."""
    keys = _wb(f"{prefix}.norm0") + _wb(f"{prefix}.conv0")
    keys += [f"{prefix}.conv0.resample_filter"] if resample else []
    keys += _wb(f"{prefix}.affine") + _wb(f"{prefix}.norm1") + _wb(f"{prefix}.conv1")
    if cin != cout or resample:
        keys += _wb(f"{prefix}.skip") if (proj or cin != cout) else []  # a same-width skip may be a pure resample
        keys += [f"{prefix}.skip.resample_filter"] if resample else []
    if heads > 0:
        keys += _wb(f"{prefix}.norm2") + _wb(f"{prefix}.qkv") + _wb(f"{prefix}.proj")
    return keys


# EDM's constructor defaults (facts, section 2), for configurations that leave them out.
SONG_DEFAULTS = dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16])
ADM_DEFAULTS = dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8])


def _expected_keys(cfg: dict, adm: bool) -> list[str]:
    cfg = {**(ADM_DEFAULTS if adm else SONG_DEFAULTS), **cfg}
    res, mc, mults, nb = cfg["img_resolution"], cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"]
    attn = cfg["attn_resolutions"]
    enc_type, dec_type = cfg.get("encoder_type", "standard"), cfg.get("decoder_type", "standard")
    label, augment = cfg.get("label_dim", 0), cfg.get("augment_dim", 0)
    proj = not adm  # SongUNet projects every resampling shortcut (resample_proj=True)

    def heads(width: int, attention: bool) -> int:
        return (width // 64 if adm else 1) if attention else 0

    def block(prefix: str, cin: int, cout: int, resample: bool = False, attention: bool = False) -> list[str]:
        return _expected_block(prefix, cin, cout, resample=resample, heads=heads(cout, attention), proj=proj)

    if adm:  # map_augment, map_layer0, map_layer1, map_label (bias-free)
        keys = (["map_augment.weight"] if augment else []) + _wb("map_layer0") + _wb("map_layer1")
        keys += ["map_label.weight"] if label else []
    else:  # map_noise (Fourier buffer), map_label, map_augment (bias-free), map_layer0, map_layer1
        keys = ["map_noise.freqs"] if cfg.get("embedding_type") == "fourier" else []
        keys += (_wb("map_label") if label else []) + (["map_augment.weight"] if augment else [])
        keys += _wb("map_layer0") + _wb("map_layer1")

    stem = mc * mults[0] if adm else mc
    keys += _wb(f"enc.{res}x{res}_conv")
    skips, c = [stem], stem
    for level, mult in enumerate(mults):
        r = res >> level
        if level > 0:
            keys += block(f"enc.{r}x{r}_down", c, c, resample=True)
            skips.append(c)
            if enc_type == "skip":
                keys += [f"enc.{r}x{r}_aux_down.resample_filter"] + _wb(f"enc.{r}x{r}_aux_skip")
            if enc_type == "residual":
                keys += _wb(f"enc.{r}x{r}_aux_residual") + [f"enc.{r}x{r}_aux_residual.resample_filter"]
        for i in range(nb):
            keys += block(f"enc.{r}x{r}_block{i}", c, mc * mult, attention=r in attn)
            c = mc * mult
            skips.append(c)

    for level in range(len(mults) - 1, -1, -1):
        r = res >> level
        if level == len(mults) - 1:
            keys += block(f"dec.{r}x{r}_in0", c, c, attention=True) + block(f"dec.{r}x{r}_in1", c, c)
        else:
            keys += block(f"dec.{r}x{r}_up", c, c, resample=True)
        for i in range(nb + 1):
            cin, c = c + skips.pop(), mc * mults[level]
            attention = r in attn and (adm or i == nb)  # SongUNet: only the level's last decoder block
            keys += block(f"dec.{r}x{r}_block{i}", cin, c, attention=attention)
        if not adm and (dec_type == "skip" or level == 0):
            if dec_type == "skip" and level < len(mults) - 1:
                keys += [f"dec.{r}x{r}_aux_up.resample_filter"]
            keys += _wb(f"dec.{r}x{r}_aux_norm") + _wb(f"dec.{r}x{r}_aux_conv")
    return keys + (_wb("out_norm") + _wb("out_conv") if adm else [])


@pytest.mark.parametrize(
    "cls, cfg",
    [
        (SongUNet, TINY_DDPMPP),
        (SongUNet, TINY_NCSNPP),
        (SongUNet, TINY_SKIP_ENCODER),
        (DhariwalUNet, TINY_ADM),
        (DhariwalUNet, dict(TINY_ADM, label_dim=0, augment_dim=9)),
    ],
    ids=["ddpmpp", "ncsnpp", "skip-encoder", "adm", "adm-augment"],
)
def test_state_dict_keys_and_order(cls, cfg):
    with torch.device("meta"):
        net = cls(**cfg)
    assert list(net.state_dict()) == _expected_keys(cfg, adm=cls is DhariwalUNet)
    assert isinstance(net.enc, torch.nn.ModuleDict) and isinstance(net.dec, torch.nn.ModuleDict)


def test_key_details_from_the_facts():
    with torch.device("meta"):
        song = SongUNet(**TINY_DDPMPP)
        ncsn = SongUNet(**TINY_NCSNPP)
        adm = DhariwalUNet(**TINY_ADM)
    sd = song.state_dict()
    assert sd["enc.8x8_down.conv0.resample_filter"].shape == (1, 1, 2, 2)
    assert sd["enc.8x8_down.skip.weight"].shape == (16, 16, 1, 1)  # SongUNet: resample_proj
    assert "map_augment.bias" not in sd and "enc.16x16_block0.conv0.resample_filter" not in sd
    assert ncsn.state_dict()["enc.8x8_aux_residual.resample_filter"].shape == (1, 1, 4, 4)
    assert ncsn.state_dict()["map_noise.freqs"].shape == (16,)  # C/2 with C = 16 * channel_mult_noise
    sd = adm.state_dict()
    assert "dec.8x8_in0.qkv.weight" in sd and sd["dec.8x8_in0.qkv.weight"].shape == (384, 128, 1, 1)
    assert "enc.8x8_down.skip.weight" not in sd and "enc.8x8_down.skip.resample_filter" in sd  # weight-free
    assert sd["map_label.weight"].shape == (256, 5) and "map_label.bias" not in sd
    assert adm.dec["8x8_in0"].num_heads == 2 and adm.enc["16x16_block0"].num_heads == 0


# ---------------------------------------------------------------------------------------------------------------------
# The published configurations: parameter counts (the facts' numbers, checked on NVIDIA's code) and strict loading.

CIFAR_DDPMPP = dict(
    img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=128,
    channel_mult=[2, 2, 2], dropout=0.13, embedding_type="positional", encoder_type="standard",
    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
)  # fmt: skip
# The facts give 56,400,643 for "NCSN++ CIFAR-10" without saying which. It is the CONDITIONAL network
# (edm-cifar10-32x32-cond-ve.pkl): label_dim 10, augment_dim 9, EDM's ncsnpp preset (Fourier embedding,
# channel_mult_noise 2, residual encoder, standard decoder, [1,3,3,1]). The unconditional one has 2,816 fewer
# (map_label: 10 x 256 + 256), 56,397,827.
CIFAR_NCSNPP = dict(
    CIFAR_DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]
)
IMAGENET_ADM = dict(
    img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, augment_dim=0, model_channels=192,
    channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.0,
    label_dropout=0,
)  # fmt: skip


@pytest.mark.parametrize(
    "cls, cfg, params, tensors",
    [
        (SongUNet, CIFAR_DDPMPP, 55_735_299, 427),
        (SongUNet, dict(CIFAR_DDPMPP, label_dim=0), 55_733_891, 425),
        (SongUNet, CIFAR_NCSNPP, 56_400_643, None),
        (SongUNet, dict(CIFAR_NCSNPP, label_dim=0), 56_400_643 - 2816, None),
        (SongUNet, dict(img_resolution=64, in_channels=3, out_channels=3, augment_dim=9), 61_805_571, None),
        (DhariwalUNet, IMAGENET_ADM, 295_899_267, 553),
    ],
    ids=["cifar-ddpmpp-cond", "cifar-ddpmpp-uncond", "cifar-ncsnpp-cond", "cifar-ncsnpp-uncond", "ffhq", "imagenet"],
)
def test_published_configurations(cls, cfg, params, tensors):
    with torch.device("meta"):
        net, twin = cls(**cfg), cls(**cfg)
    assert sum(p.numel() for p in net.parameters()) == params
    sd = net.state_dict()
    if tensors is not None:
        assert len(sd) == tensors
    assert list(sd) == _expected_keys(cfg, adm=cls is DhariwalUNet)
    twin.load_state_dict(sd, strict=True, assign=True)  # EDMPrecond's keys minus the "model." prefix


def test_imagenet_label_projection_shape():
    with torch.device("meta"):
        net = DhariwalUNet(**IMAGENET_ADM)
    assert net.state_dict()["map_label.weight"].shape == (768, 1000)
    assert net.map_augment is None and net.enc["64x64_conv"].weight.shape == (192, 3, 3, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Layers against direct computations.


def test_linear_and_plain_conv():
    torch.manual_seed(0)
    lin = Linear(5, 7)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(3, 5)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    assert Linear(5, 7, bias=False).bias is None and isinstance(lin, torch.nn.Linear)

    conv = Conv2d(4, 6, 3)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert isinstance(conv, torch.nn.Conv2d) and conv.padding == (1, 1)
    assert isinstance(make_conv2d(4, 6, 1), Conv2d) and isinstance(make_conv2d(4, 6, 3, down=True), ResampleConv2d)


def test_group_norm_group_count_and_values():
    assert GroupNorm(16).num_groups == 4 and GroupNorm(48).num_groups == 12
    assert GroupNorm(128).num_groups == 32 and GroupNorm(768).num_groups == 32
    torch.manual_seed(0)
    norm = GroupNorm(48, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 48, 4, 4, dtype=torch.float64)
    g = x.reshape(2, 12, -1)
    expected = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()).reshape(
        x.shape
    )
    expected = expected * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
    torch.testing.assert_close(norm(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def _filter(taps: Sequence[float]) -> torch.Tensor:
    f = torch.tensor(taps, dtype=torch.float32)
    return (f[:, None] * f[None, :] / f.sum() ** 2)[None, None]


@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
@pytest.mark.parametrize("up", [False, True])
@pytest.mark.parametrize("kernel", [0, 1, 3])
def test_resample_conv_matches_explicit_filtering(taps, up, kernel):
    torch.manual_seed(0)
    cin, cout = 4, (4 if kernel == 0 else 6)
    conv = ResampleConv2d(cin, cout, kernel, up=up, down=not up, resample_filter=taps)
    f = _filter(taps)
    assert torch.equal(conv.resample_filter, f)
    x = torch.randn(2, cin, 8, 8)
    pad = (len(taps) - 1) // 2
    if up:
        y = F.conv_transpose2d(x, (4 * f).repeat(cin, 1, 1, 1), groups=cin, stride=2, padding=pad)
    else:
        y = F.conv2d(x, f.repeat(cin, 1, 1, 1), groups=cin, stride=2, padding=pad)
    if kernel:
        torch.nn.init.normal_(conv.bias)
        y = F.conv2d(y, conv.weight, conv.bias, padding=kernel // 2)
    else:
        assert conv.weight is None and conv.bias is None
    torch.testing.assert_close(conv(x), y, atol=1e-5, rtol=1e-5)
    assert conv(x).shape[-1] == (16 if up else 4)


def test_two_tap_resampling_is_box_filtering():
    # [1,1]: downsampling averages 2x2 blocks, upsampling repeats each pixel 2x2 (independent of any convolution).
    x = torch.randn(2, 3, 8, 8)
    down = ResampleConv2d(3, 3, 0, down=True)
    up = ResampleConv2d(3, 3, 0, up=True)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_fused_resample_convolves_first():
    torch.manual_seed(0)
    conv = ResampleConv2d(3, 5, 3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, 8, 8)
    y = F.conv2d(x, conv.weight, padding=1 + 1)  # kernel 3 and filter padding together, at full resolution
    y = F.conv2d(y, _filter([1, 3, 3, 1]).repeat(5, 1, 1, 1), groups=5, stride=2) + conv.bias[:, None, None]
    torch.testing.assert_close(conv(x), y, atol=1e-5, rtol=1e-5)
    assert conv(x).shape == (2, 5, 4, 4)

    up = ResampleConv2d(3, 5, 3, up=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    y = F.conv_transpose2d(x, 4 * _filter([1, 3, 3, 1]).repeat(3, 1, 1, 1), groups=3, stride=2, padding=2)
    torch.testing.assert_close(up(x), F.conv2d(y, up.weight, up.bias), atol=1e-5, rtol=1e-5)


def test_positional_embedding_formula():
    x = torch.tensor([-1.3, 0.0, 0.7, 2.5])
    for endpoint in (False, True):
        emb = PositionalEmbedding(8, endpoint=endpoint)(x)
        freqs = torch.tensor([(1 / 10000) ** (i / (4 - endpoint)) for i in range(4)], dtype=torch.float64)
        angles = x.double()[:, None] * freqs[None]
        torch.testing.assert_close(emb.double(), torch.cat([angles.cos(), angles.sin()], 1), atol=1e-6, rtol=1e-6)
    assert list(PositionalEmbedding(8).state_dict()) == []


def test_fourier_embedding_formula():
    torch.manual_seed(0)
    emb = FourierEmbedding(8)
    assert emb.freqs.shape == (4,) and 4 < emb.freqs.abs().max() < 100  # N(0, 16^2) draws
    x = torch.tensor([-1.3, 0.7])
    angles = 2 * math.pi * x.double()[:, None] * emb.freqs.double()[None]
    torch.testing.assert_close(emb(x).double(), torch.cat([angles.cos(), angles.sin()], 1), atol=1e-4, rtol=1e-5)


def _identity_mapping(net: torch.nn.Module, noise_channels: int) -> None:
    """Make map_layer0 copy the noise embedding into its first channels and map_layer1 the identity."""
    with torch.no_grad():
        for layer in (net.map_layer0, net.map_layer1):
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[:noise_channels, :noise_channels] = torch.eye(noise_channels)


def test_songunet_swaps_sin_cos_and_adm_does_not():
    # With the mapping layers made transparent, the embedding reaching the blocks exposes the sinusoids' order.
    sigma = torch.tensor([0.3, -1.1])
    song = SongUNet(**dict(TINY_DDPMPP, label_dim=0, augment_dim=0))
    _identity_mapping(song, 16)
    angles = sigma[:, None] * (1 / 10000) ** (torch.arange(8) / 7)  # endpoint=True
    expected = F.silu(F.silu(torch.cat([angles.sin(), angles.cos()], 1)))
    got = song._embed(sigma, None, None, 2)
    torch.testing.assert_close(got[:, :16], expected, atol=1e-6, rtol=1e-6)

    adm = DhariwalUNet(**dict(TINY_ADM, label_dim=0))
    _identity_mapping(adm, 64)
    angles = sigma[:, None] * (1 / 10000) ** (torch.arange(32) / 32)  # endpoint=False
    expected = F.silu(F.silu(torch.cat([angles.cos(), angles.sin()], 1)))
    torch.testing.assert_close(adm._embed(sigma, None, None, 2)[:, :64], expected, atol=1e-6, rtol=1e-6)


def test_label_and_augment_embeddings():
    song = SongUNet(**TINY_DDPMPP)  # label_dim 4: labels enter times sqrt(4), through a biased Linear
    _identity_mapping(song, 16)
    sigma, labels, aug = torch.tensor([0.5]), torch.eye(4)[[2]], torch.randn(1, 9)
    base = song.map_noise(sigma).roll(8, dims=1)  # the [sin, cos] swap
    pre = base + 2 * labels @ song.map_label.weight.T + song.map_label.bias
    torch.testing.assert_close(song._embed(sigma, labels, None, 1)[:, :16], F.silu(F.silu(pre)))
    pre = pre + aug @ song.map_augment.weight.T
    torch.testing.assert_close(song._embed(sigma, labels, aug, 1)[:, :16], F.silu(F.silu(pre)))

    adm = DhariwalUNet(**TINY_ADM)  # label_dim 5: unscaled, bias-free, after map_layer1
    _identity_mapping(adm, 64)
    labels = torch.eye(5)[[1]]
    pre = F.silu(adm.map_noise(sigma))
    pre = torch.cat([pre, torch.zeros(1, 192)], 1) + labels @ adm.map_label.weight.T
    torch.testing.assert_close(adm._embed(sigma, labels, None, 1), F.silu(pre))


def test_attention_weights_scale_k_in_model_dtype_then_softmax_in_fp32():
    torch.manual_seed(0)
    q, k = torch.randn(3, 8, 5), torch.randn(3, 8, 6)
    expected = torch.softmax(q.transpose(1, 2).double() @ k.double() / math.sqrt(8), dim=-1)
    torch.testing.assert_close(attention_weights(q, k).double(), expected, atol=1e-6, rtol=1e-6)
    w = attention_weights(q.half(), k.half())
    assert w.dtype == torch.float16
    ref = torch.softmax(q.half().float().transpose(1, 2) @ (k.half() / math.sqrt(8)).float(), -1).half()
    assert torch.equal(w, ref)


def _randomize(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random weights of a sensible scale everywhere (fresh networks zero their last convolutions)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            scale = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def _resampled(t: torch.Tensor, mode: str | None, taps: Sequence[float]) -> torch.Tensor:
    """2x FIR resampling written out: per-channel filter, stride 2, padding (len - 1) // 2, x4 for the transposed."""
    if mode is None:
        return t
    f, c, pad = _filter(taps), t.shape[1], (len(taps) - 1) // 2
    if mode == "up":
        return F.conv_transpose2d(t, (4 * f).repeat(c, 1, 1, 1), groups=c, stride=2, padding=pad)
    return F.conv2d(t, f.repeat(c, 1, 1, 1), groups=c, stride=2, padding=pad)


def _reference_block(
    block: UNetBlock, x: torch.Tensor, emb: torch.Tensor, mode: str | None = None, taps: Sequence[float] = (1, 1)
) -> torch.Tensor:
    """The block recomputed from its parameters with torch.nn.functional, attention through SDPA."""
    p = dict(block.named_parameters())

    def norm(name: str, t: torch.Tensor, eps: float) -> torch.Tensor:
        return F.group_norm(t, getattr(block, name).num_groups, p[f"{name}.weight"], p[f"{name}.bias"], eps)

    eps = block.norm0.eps
    h = _resampled(F.silu(norm("norm0", x, eps)), mode, taps)  # resampling comes before conv0's 3x3
    h = F.conv2d(h, p["conv0.weight"], p["conv0.bias"], padding=1)
    e = (emb @ p["affine.weight"].T + p["affine.bias"])[:, :, None, None]
    if block.adaptive_scale:
        scale, shift = e.chunk(2, dim=1)
        h = F.silu(norm("norm1", h, eps) * (1 + scale) + shift)
    else:
        h = F.silu(norm("norm1", h + e, eps))
    h = F.conv2d(h, p["conv1.weight"], p["conv1.bias"], padding=1)
    skip = _resampled(x, mode, taps)
    skip = F.conv2d(skip, p["skip.weight"], p["skip.bias"]) if "skip.weight" in p else skip
    x = (h + skip) * block.skip_scale
    if not block.num_heads:
        return x

    n, c, hh, ww = x.shape
    heads = block.num_heads
    qkv = F.conv2d(norm("norm2", x, eps), p["qkv.weight"], p["qkv.bias"])
    # Channel 3*(head*c_head + i) + j is component j (q, k, v) of channel i of that head.
    qkv = qkv.reshape(n, heads, c // heads, 3, hh * ww)
    q, k, v = (qkv[:, :, :, j].transpose(2, 3) for j in range(3))  # [n, heads, tokens, c_head]
    a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c_head)) v
    a = a.transpose(2, 3).reshape(n, c, hh, ww)
    return (F.conv2d(a, p["proj.weight"], p["proj.bias"]) + x) * block.skip_scale


SONG_BLOCK = dict(skip_scale=math.sqrt(0.5), eps=1e-6, adaptive_scale=False, resample_proj=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_heads=1, **SONG_BLOCK),
        dict(num_heads=2, **SONG_BLOCK),
        dict(channels_per_head=8),  # ADM-style: adaptive scale, eps 1e-5, skip_scale 1, heads = out // 8 = 3
    ],
    ids=["song-1-head", "song-2-heads", "adm-3-heads"],
)
def test_unet_block_matches_hand_computation(kwargs):
    torch.manual_seed(0)
    block = _randomize(UNetBlock(16, 24, 32, attention=True, **kwargs))
    x, emb = torch.randn(2, 16, 6, 6), torch.randn(2, 32)
    torch.testing.assert_close(block(x, emb), _reference_block(block, x, emb), atol=1e-5, rtol=1e-5)
    # emb of batch 1 broadcasts over the images
    torch.testing.assert_close(
        block(x, emb[:1]), _reference_block(block, x, emb[:1].expand(2, -1)), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "mode, taps, kwargs",
    [
        ("down", [1, 1], SONG_BLOCK),  # DDPM++ _down: projected skip
        ("up", [1, 3, 3, 1], SONG_BLOCK),  # NCSN++ _up
        ("down", [1, 1], {}),  # ADM _down: weight-free resampled skip
        ("up", [1, 1], {}),
    ],
    ids=["song-down", "song-up-1331", "adm-down", "adm-up"],
)
def test_resampling_unet_block_matches_hand_computation(mode, taps, kwargs):
    torch.manual_seed(0)
    block = _randomize(UNetBlock(16, 16, 32, up=mode == "up", down=mode == "down", resample_filter=taps, **kwargs))
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 32)
    expected = _reference_block(block, x, emb, mode, taps)
    assert expected.shape[-1] == (16 if mode == "up" else 4)
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-5)


def test_unet_block_skip_rules():
    same = UNetBlock(16, 16, 8)
    assert same.skip is None and same.num_heads == 0
    down = UNetBlock(16, 16, 8, down=True)  # resample_proj=False: a weight-free resample
    assert isinstance(down.skip, ResampleConv2d) and down.skip.weight is None
    assert down.skip(torch.ones(1, 16, 4, 4)).shape == (1, 16, 2, 2)
    down_proj = UNetBlock(16, 16, 8, down=True, resample_proj=True)
    assert down_proj.skip.weight.shape == (16, 16, 1, 1)
    widen = UNetBlock(16, 32, 8)
    assert isinstance(widen.skip, Conv2d) and widen.skip.weight.shape == (32, 16, 1, 1)
    assert UNetBlock(16, 32, 8, attention=True).num_heads == 0  # 32 // 64: too narrow for ADM's heads


# ---------------------------------------------------------------------------------------------------------------------
# Whole networks.

NETS = [(SongUNet, TINY_DDPMPP), (SongUNet, TINY_NCSNPP), (SongUNet, TINY_SKIP_ENCODER), (DhariwalUNet, TINY_ADM)]
NET_IDS = ["ddpmpp", "ncsnpp", "skip-encoder", "adm"]


def _inputs(cfg: dict, n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, cfg["in_channels"], cfg["img_resolution"], cfg["img_resolution"], generator=g)
    noise = torch.randn(n, generator=g)
    labels = torch.eye(cfg["label_dim"])[torch.arange(n) % cfg["label_dim"]] if cfg.get("label_dim") else None
    return x, noise, labels


def _lin(t: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    y = t @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def _conv(t: torch.Tensor, sd: dict, name: str, padding: int = 1) -> torch.Tensor:
    return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=padding)


def _head_norm(t: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    groups = min(32, t.shape[1] // 4)
    return F.group_norm(t, groups, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _sinusoids(noise: torch.Tensor, channels: int, endpoint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    half = channels // 2
    angles = noise[:, None] * (1 / 10000) ** (torch.arange(half) / (half - endpoint))
    return angles.cos(), angles.sin()


def _reference_song(net, cfg, x, noise, labels, aug=None):
    """SongUNet's forward written out from the rules, on the network's tensors (blocks via _reference_block)."""
    cfg = {**SONG_DEFAULTS, **cfg}
    sd, enc, dec = net.state_dict(), net.enc, net.dec
    mults, nb, res0 = cfg["channel_mult"], cfg["num_blocks"], cfg["img_resolution"]
    taps = cfg.get("resample_filter", [1, 1])
    enc_type, dec_type = cfg.get("encoder_type", "standard"), cfg.get("decoder_type", "standard")

    if cfg.get("embedding_type") == "fourier":
        angles = noise[:, None] * (2 * math.pi * sd["map_noise.freqs"])[None]
        cos, sin = angles.cos(), angles.sin()
    else:
        cos, sin = _sinusoids(noise, cfg["model_channels"] * cfg.get("channel_mult_noise", 1), endpoint=True)
    e = torch.cat([sin, cos], 1)  # SongUNet swaps the halves
    if cfg.get("label_dim"):
        e = e + _lin(labels * math.sqrt(cfg["label_dim"]), sd, "map_label")
    if cfg.get("augment_dim") and aug is not None:
        e = e + _lin(aug, sd, "map_augment")
    e = F.silu(_lin(F.silu(_lin(e, sd, "map_layer0")), sd, "map_layer1"))

    h = _conv(x, sd, f"enc.{res0}x{res0}_conv")
    skips, aux = [h], x
    for level in range(len(mults)):
        r = res0 >> level
        if level:
            h = _reference_block(enc[f"{r}x{r}_down"], h, e, "down", taps)
            if enc_type == "skip":
                aux = _resampled(aux, "down", taps)
                h = h + _conv(aux, sd, f"enc.{r}x{r}_aux_skip", padding=0)
            if enc_type == "residual":  # fused: 3x3 conv with both paddings, then filter with stride 2
                name, c = f"enc.{r}x{r}_aux_residual", h.shape[1]
                t = F.conv2d(aux, sd[f"{name}.weight"], padding=1 + (len(taps) - 1) // 2)
                t = (
                    F.conv2d(t, _filter(taps).repeat(c, 1, 1, 1), groups=c, stride=2)
                    + sd[f"{name}.bias"][:, None, None]
                )
                h = aux = (h + t) / math.sqrt(2)
            skips.append(h)
        for i in range(nb):
            h = _reference_block(enc[f"{r}x{r}_block{i}"], h, e)
            skips.append(h)

    out = None
    for level in reversed(range(len(mults))):
        r = res0 >> level
        if level == len(mults) - 1:
            h = _reference_block(dec[f"{r}x{r}_in1"], _reference_block(dec[f"{r}x{r}_in0"], h, e), e)
        else:
            h = _reference_block(dec[f"{r}x{r}_up"], h, e, "up", taps)
        for i in range(nb + 1):
            h = _reference_block(dec[f"{r}x{r}_block{i}"], torch.cat([h, skips.pop()], 1), e)
        if dec_type == "skip" or level == 0:
            t = _conv(F.silu(_head_norm(h, sd, f"dec.{r}x{r}_aux_norm", 1e-6)), sd, f"dec.{r}x{r}_aux_conv")
            out = t if out is None else t + _resampled(out, "up", taps)
    return out


def _reference_adm(net, cfg, x, noise, labels, aug=None):
    """DhariwalUNet's forward written out from the rules, on the network's tensors (blocks via _reference_block)."""
    cfg = {**ADM_DEFAULTS, **cfg}
    sd, enc, dec = net.state_dict(), net.enc, net.dec
    mults, nb, res0 = cfg["channel_mult"], cfg["num_blocks"], cfg["img_resolution"]
    e = torch.cat(_sinusoids(noise, cfg["model_channels"], endpoint=False), 1)  # [cos, sin], no swap
    if cfg.get("augment_dim") and aug is not None:
        e = e + _lin(aug, sd, "map_augment")
    e = _lin(F.silu(_lin(e, sd, "map_layer0")), sd, "map_layer1")
    if cfg.get("label_dim"):
        e = e + _lin(labels, sd, "map_label")
    e = F.silu(e)
    h = _conv(x, sd, f"enc.{res0}x{res0}_conv")
    skips = [h]
    for level in range(len(mults)):
        r = res0 >> level
        if level:
            h = _reference_block(enc[f"{r}x{r}_down"], h, e, "down")
            skips.append(h)
        for i in range(nb):
            h = _reference_block(enc[f"{r}x{r}_block{i}"], h, e)
            skips.append(h)
    for level in reversed(range(len(mults))):
        r = res0 >> level
        if level == len(mults) - 1:
            h = _reference_block(dec[f"{r}x{r}_in1"], _reference_block(dec[f"{r}x{r}_in0"], h, e), e)
        else:
            h = _reference_block(dec[f"{r}x{r}_up"], h, e, "up")
        for i in range(nb + 1):
            h = _reference_block(dec[f"{r}x{r}_block{i}"], torch.cat([h, skips.pop()], 1), e)
    return _conv(F.silu(_head_norm(h, sd, "out_norm", 1e-5)), sd, "out_conv")


@pytest.mark.parametrize("cls, cfg", NETS, ids=NET_IDS)
def test_forward_matches_the_rules_written_out(cls, cfg):
    torch.manual_seed(0)
    net = _randomize(cls(**cfg))
    x, noise, labels = _inputs(cfg)
    aug = torch.randn(3, cfg["augment_dim"]) if cfg.get("augment_dim") else None
    reference = _reference_adm if cls is DhariwalUNet else _reference_song
    expected = reference(net, cfg, x, noise, labels, aug)
    torch.testing.assert_close(net(x, noise, labels, aug), expected, atol=1e-5, rtol=1e-5)


def test_group_norm_eps_per_architecture():
    # eps 1e-6 vs 1e-5 moves outputs by ~2e-5 only, so the setting is checked directly as well.
    song, adm = SongUNet(**TINY_NCSNPP), DhariwalUNet(**TINY_ADM)
    assert {m.eps for m in song.modules() if isinstance(m, GroupNorm)} == {1e-6}
    assert {m.eps for m in adm.modules() if isinstance(m, GroupNorm)} == {1e-5}


@pytest.mark.parametrize("cls, cfg", NETS, ids=NET_IDS)
def test_forward_shape_finite_deterministic_broadcast(cls, cfg):
    torch.manual_seed(0)
    net = _randomize(cls(**cfg))
    x, noise, labels = _inputs(cfg)
    y = net(x, noise, labels)
    assert y.shape == (3, cfg["out_channels"], cfg["img_resolution"], cfg["img_resolution"])
    assert torch.isfinite(y).all() and y.abs().mean() > 1e-3
    assert torch.equal(net(x, noise, labels), y)
    # one noise label for the whole batch broadcasts, as EDM's samplers pass it
    y1 = net(x, noise[:1], labels)
    torch.testing.assert_close(y1, net(x, noise[:1].expand(3), labels), atol=1e-5, rtol=1e-5)
    if cfg.get("augment_dim"):
        assert not torch.allclose(net(x, noise, labels, torch.randn(3, cfg["augment_dim"])), y)
        assert torch.equal(net(x, noise, labels, torch.zeros(3, cfg["augment_dim"])), y)  # bias-free
    if labels is not None:
        assert not torch.allclose(net(x, noise, labels.roll(1, 0)), y)
        with pytest.raises(ValueError, match="class-conditional"):
            net(x, noise, None)


@pytest.mark.parametrize("cls, cfg", NETS, ids=NET_IDS)
def test_fresh_network_is_finite_and_low_precision_runs(cls, cfg):
    torch.manual_seed(0)
    x, noise, labels = _inputs(cfg, n=2)
    assert torch.isfinite(cls(**cfg).eval()(x, noise, labels)).all()  # EDM's own init: zero/1e-5 last layers
    net = _randomize(cls(**cfg))
    y = net(x, noise, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = net(x, noise, labels)
    y_bf16 = net(x.bfloat16(), noise, labels)  # weights are cast to the input's dtype, as in EDM
    for low in (y_auto, y_bf16):
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        assert (low.float() - y).norm() / y.norm() < 0.05


def test_strict_round_trip_and_buffers():
    torch.manual_seed(0)
    src = _randomize(SongUNet(**TINY_NCSNPP), seed=3)
    torch.manual_seed(1)
    dst = SongUNet(**TINY_NCSNPP).eval()
    assert not torch.equal(src.map_noise.freqs, dst.map_noise.freqs)  # random Fourier buffer: must be loaded
    dst.load_state_dict(src.state_dict(), strict=True)
    x, noise, _ = _inputs(TINY_NCSNPP)
    assert torch.equal(dst(x, noise, None), src(x, noise, None))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dst.load_state_dict({**src.state_dict(), "map_augment.bias": torch.zeros(32)}, strict=True)


def test_dropout_follows_training_mode():
    cfg = dict(TINY_DDPMPP, dropout=0.5, label_dropout=0.5)
    net = _randomize(SongUNet(**cfg))
    x, noise, labels = _inputs(cfg)
    assert torch.equal(net(x, noise, labels), net(x, noise, labels))
    net.train()
    torch.manual_seed(0)
    a = net(x, noise, labels)
    torch.manual_seed(1)
    assert not torch.equal(a, net(x, noise, labels))


def test_edm_kwargs_pass_straight_in():
    # EDMPrecond builds its model as model_type(img_resolution=, in_channels=, out_channels=, label_dim=, **kwargs),
    # with the checkpoint's lists and numpy scalars.
    np = pytest.importorskip("numpy")
    assert set(NETWORKS) == {"SongUNet", "DhariwalUNet"}
    with torch.device("meta"):
        net = NETWORKS["SongUNet"](**dict(CIFAR_DDPMPP, dropout=np.float64(0.13), label_dropout=0))
    assert net.enc["32x32_block0"].dropout == pytest.approx(0.13)
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(16, 3, 3, encoder_type="bogus")


def test_peft_lora_wraps_the_plain_layers():
    peft = pytest.importorskip("peft")
    net = _randomize(SongUNet(**TINY_DDPMPP))
    x, noise, labels = _inputs(TINY_DDPMPP)
    before = net(x, noise, labels)
    config = peft.LoraConfig(r=2, target_modules=["qkv", "proj", "conv1", "map_layer0"])
    net = peft.inject_adapter_in_model(config, net)
    assert any(name.endswith("qkv.lora_A.default") for name, _ in net.named_modules())
    torch.testing.assert_close(net(x, noise, labels), before)  # LoRA's B factor starts at zero
