"""The image track: image data, the FID-style measure, diffusers teachers, and the exported one-step pipeline."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import in_fresh_process
from disback.cli import main
from disback.config import build_config
from disback.data import load_data
from disback.data.images import read_idx
from disback.diffusion.denoisers import VPDenoiser
from disback.errors import DisbackError
from disback.metrics.images import classifier_features, frechet_distance, statistics

IMAGE_ARGS = [
    "--preset",
    "digits",
    "--quiet",
    "--set",
    "data.n_eval=100",
    "--set",
    "teacher.steps=60",
    "--set",
    "teacher.heun_steps=4",
    "--set",
    "degrade.steps=8",
    "--set",
    "degrade.nodes=4",
    "--set",
    "distill.steps=12",
    "--set",
    "distill.batch=32",
    "--set",
    "distill.switch_every=3",
    "--set",
    "eval.every=6",
    "--set",
    "network.channels=[8, 16]",
    "--set",
    "eval.classifier_steps=300",
]


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, c1), (m2, c2) = statistics(a), statistics(b)
    expected = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(sqrtm(c1 @ c2)))
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-8)


def test_feature_classifier_is_trained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DISBACK_CACHE", str(tmp_path))
    data = load_data(build_config("digits").data, 0)
    _, first = classifier_features(data.train, data.labels, steps=300)
    fn, second = classifier_features(data.train, data.labels, steps=300)
    assert not first["cached"] and second["cached"]
    assert first["task"] == "classes" and first["accuracy"] > 0.8  # digits are easy; a broken net is near 0.1
    assert fn(torch.as_tensor(data.reference[:5])).shape == (5, 128)


def _png_folder(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        img = np.zeros((h, w), dtype=np.uint8)
        img[h // 4 : 3 * h // 4, rng.integers(0, w // 2) : w - 1] = 255
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def test_image_folder_npz_and_idx_inputs(tmp_path):
    cfg = build_config("digits").data
    _png_folder(tmp_path / "pngs", [(16, 16), (12, 20), (8, 8)] * 10)  # mixed sizes: cropped and resized
    cfg.name = str(tmp_path / "pngs")
    data = load_data(cfg, 0)
    assert data.shape == (1, 8, 8) and data.train.min() >= 0 and data.train.max() <= 1
    assert len(data.train) + len(data.reference) == 30 and data.labels is None
    np.savez(tmp_path / "imgs.npz", images=(np.random.default_rng(0).random((40, 16, 16, 3)) * 255).astype(np.uint8))
    cfg.name = str(tmp_path / "imgs.npz")
    assert load_data(cfg, 0).shape == (1, 8, 8)  # RGB averaged to the preset's one channel, resized
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), images)


def edm_zip(path, n: int, size: int = 16, labels: bool = True, rgb: bool = True):
    """A zip as NVlabs/edm's dataset_tool.py writes one: PNGs in numbered folders and dataset.json with labels."""
    rng = np.random.default_rng(0)
    names, classes = [f"{i // 10:05d}/img{i:08d}.png" for i in range(n)], [int(i % 3) for i in range(n)]
    with zipfile.ZipFile(path, "w") as z:
        for name, label in zip(names, classes):
            pixels = np.full((size, size, 3) if rgb else (size, size), 40 * label, dtype=np.uint8)
            pixels = pixels + rng.integers(0, 20, pixels.shape, dtype=np.uint8)
            z.writestr(name, _png_bytes(pixels))
        z.writestr("dataset.json", json.dumps({"labels": [[f, c] for f, c in zip(names, classes)] if labels else None}))
    return path


def test_an_edm_dataset_zip_gives_images_resized_and_their_labels(tmp_path):
    cfg = build_config("digits").data
    cfg.name = str(edm_zip(tmp_path / "data.zip", 30))
    data = load_data(cfg, 0)
    assert data.shape == (1, 8, 8) and len(data.train) + len(data.reference) == 30
    # each image's label follows it through the shuffle: the class sets the brightness
    brightness = data.train.mean((1, 2, 3))
    assert set(data.labels.tolist()) == {0, 1, 2}
    assert all(abs(b * 255 - 40 * c - 10) < 6 for b, c in zip(brightness, data.labels)), (brightness, data.labels)
    cfg.name = str(edm_zip(tmp_path / "unlabelled.zip", 25, labels=False))
    assert load_data(cfg, 0).labels is None
    with zipfile.ZipFile(tmp_path / "partial.zip", "w") as z:
        for i in range(25):
            z.writestr(f"img{i}.png", _png_bytes(np.zeros((8, 8), dtype=np.uint8)))
        z.writestr("dataset.json", json.dumps({"labels": [["img0.png", 1]]}))
    cfg.name = str(tmp_path / "partial.zip")
    with pytest.raises(DisbackError, match="gives no label for 24 images"):
        load_data(cfg, 0)
    (tmp_path / "bad.zip").write_bytes(b"not a zip at all")
    cfg.name = str(tmp_path / "bad.zip")
    with pytest.raises(DisbackError, match="cannot read .*bad.zip as a zip of images"):
        load_data(cfg, 0)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    return buffer.getvalue()


def test_bad_image_inputs_give_clear_errors(tmp_path):
    cfg = build_config("digits").data
    (tmp_path / "empty").mkdir()
    cfg.name = str(tmp_path / "empty")
    with pytest.raises(DisbackError, match="no image files"):
        load_data(cfg, 0)
    _png_folder(tmp_path / "broken", [(8, 8)] * 25)
    (tmp_path / "broken" / "zz.png").write_bytes(b"not a png")
    cfg.name = str(tmp_path / "broken")
    with pytest.raises(DisbackError, match="cannot read image .*zz.png"):
        load_data(cfg, 0)
    cfg.name = "digits"
    points_cfg = build_config("toy2d").data
    points_cfg.name = str(tmp_path / "broken")
    with pytest.raises(DisbackError, match="image preset"):
        load_data(points_cfg, 0)


def test_class_conditioning_needs_labels_and_changes_the_output(tmp_path):
    from disback.diffusion.denoisers import build_denoiser

    cfg = build_config("digits", overrides={"network": {"num_classes": 10, "channels": [8, 16]}})
    d = build_denoiser(cfg.network, (1, 8, 8), 0.5)
    torch.nn.init.normal_(d.backbone.unet.class_embedding.weight)
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 1.0])
    assert not torch.allclose(d(x, s, torch.tensor([0, 0])), d(x, s, torch.tensor([0, 7])))
    _png_folder(tmp_path / "pngs", [(8, 8)] * 25)
    assert (
        main(
            [
                "teacher",
                "--preset",
                "digits",
                "--data",
                str(tmp_path / "pngs"),
                "--set",
                "network.num_classes=10",
                "--out",
                str(tmp_path / "t"),
                "--quiet",
            ]
        )
        == 2
    )
    with pytest.raises(DisbackError, match="must be 0, or positive with network.kind 'unet'"):
        build_config("toy2d", overrides={"network": {"num_classes": 3}})


def test_vp_wrapper_maps_sigmas_to_timesteps_and_predicts_x0():
    from diffusers import DDPMScheduler, UNet2DModel

    sched = DDPMScheduler(num_train_timesteps=100)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    d = VPDenoiser(unet, sched.alphas_cumprod)
    table = d.log_sigmas.exp()
    assert torch.allclose(d.sigma_to_t(table[[0, 17, 99]]), torch.tensor([0.0, 17.0, 99.0]), atol=1e-3)
    x, sigma = torch.randn(2, 1, 8, 8), table[[40, 40]]
    abar = sched.alphas_cumprod[40]
    eps = unet(x * abar.sqrt(), torch.tensor([40.0, 40.0])).sample
    assert torch.allclose(d(x, sigma), x - sigma[0] * eps, atol=1e-4)


def _diffusers_teacher(folder):
    """A tiny DDPM model trained for a few steps on digits, saved as a pipeline folder (unet/ + scheduler/)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=200)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    x0 = torch.as_tensor(load_data(build_config("digits").data, 0).train[:256]) * 2 - 1
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    for _ in range(5):
        t = torch.randint(0, 200, (64,))
        noise, batch = torch.randn(64, 1, 8, 8), x0[torch.randint(0, 256, (64,))]
        loss = (unet(sched.add_noise(batch, noise, t), t).sample - noise).square().mean()
        opt.zero_grad(), loss.backward(), opt.step()
    unet.save_pretrained(folder / "unet")
    sched.save_pretrained(folder / "scheduler")
    return unet


@pytest.mark.slow
def test_a_saved_diffusers_teacher_is_distilled_through_the_same_code_path(tmp_path, capsys):
    _diffusers_teacher(tmp_path / "ddpm")
    out = tmp_path / "demo"
    assert main(["demo", "--pretrained", str(tmp_path / "ddpm"), "--out", str(out), *IMAGE_ARGS]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["measure"] == "fid" and "pretrained" in s["budgets"]["teacher"]
    assert [r["target_node"] for r in s["runs"]["disback"]["curve"]][-1] == 0
    assert np.isfinite([r["fid"] for r in s["runs"]["baseline"]["curve"]]).all()
    # The imported teacher is the diffusers model, weight for weight.
    from diffusers import UNet2DModel

    from disback.storage.models import load_model

    teacher, meta = load_model(out / "teacher" / "teacher.safetensors")
    original = UNet2DModel.from_pretrained(tmp_path / "ddpm", subfolder="unet")
    assert meta.kind == "vp"
    assert all(torch.equal(a, b) for a, b in zip(teacher.unet.state_dict().values(), original.state_dict().values()))


@pytest.mark.slow
@pytest.mark.parametrize("classes", [0, 10])
def test_digits_demo_export_and_load_in_a_fresh_process(tmp_path, capsys, classes):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *IMAGE_ARGS, "--set", f"network.num_classes={classes}"]) == 0
    for name in ("report.md", "curves.png", "samples.png", "summary.json"):
        assert (out / name).is_file()
    assert "NOT Inception FID" in (out / "report.md").read_text()
    assert main(["export", str(out), "--out", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file() and (tmp_path / "pipe" / "pipeline.py").is_file()

    from disback.storage.models import load_model

    generator, meta = load_model(out / "disback" / "generator.safetensors")
    assert meta.num_classes == classes
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([3, 1, 4, 1]) if classes else None  # the pipeline's labels below
    with torch.no_grad():
        expected = (generator(z, labels) / 2 + 0.5).clamp(0, 1)
    np.save(tmp_path / "z.npy", z.numpy())
    script = (
        "import sys, numpy as np, torch\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r}, "
        f"custom_pipeline={str(tmp_path / 'pipe')!r}, trust_remote_code=True)\n"
        f"z = torch.from_numpy(np.load({str(tmp_path / 'z.npy')!r}))\n"
        f"out = pipe(batch_size=4, noise=z, output_type='pt', class_labels={[3, 1, 4, 1] if classes else None}).images\n"
        f"np.save({str(tmp_path / 'images.npy')!r}, out.numpy())\n"
        "pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(0)).images\n"
        "assert len(pil) == 2 and pil[0].size == (8, 8)\n"
    )
    in_fresh_process(script, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected.numpy(), atol=1e-5)
    # Exporting over a non-empty folder is refused.
    assert main(["export", str(out), "--out", str(tmp_path / "pipe")]) == 2


def test_a_k_step_vp_generator_exports_its_rollout_and_a_one_step_one_its_old_config(tmp_path):
    """A diffusers teacher (v-prediction) as a 2-step generator: the pipeline holds each level's UNet timestep and
    re-noises between the steps as the generator does; a one-level generator keeps the numbers of one-step exports."""
    from diffusers import DDPMScheduler, UNet2DModel

    from disback.diffusion.generator import with_steps
    from disback.jobs.export import export
    from disback.jobs.pipeline_onestep import OneStepPipeline
    from disback.storage.kinds import import_pretrained
    from disback.storage.models import generator_from_teacher, load_model, save_model

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(tmp_path / "ddpm" / "unet")
    DDPMScheduler(num_train_timesteps=200, prediction_type="v_prediction").save_pretrained(
        tmp_path / "ddpm" / "scheduler"
    )
    teacher, meta = import_pretrained(str(tmp_path / "ddpm"))
    for levels in ([2.5, 0.6], [1.5]):
        name = f"g{len(levels)}"
        generator = generator_from_teacher(teacher, meta, levels)
        save_model(generator, tmp_path / f"{name}.safetensors", meta.as_generator(generator.sigma_g))
        export(tmp_path / f"{name}.safetensors", tmp_path / name)
    config = json.loads((tmp_path / "g2" / "model_index.json").read_text())
    sigmas = torch.tensor([2.5, 0.6])
    assert config["sigma_g"] == [2.5, 0.6] and config["timestep"] == teacher.sigma_to_t(sigmas).tolist()
    one = json.loads((tmp_path / "g1" / "model_index.json").read_text())
    assert one["sigma_g"] == 1.5 and isinstance(one["timestep"], float)  # numbers, as before k steps
    generator, _ = load_model(tmp_path / "g2.safetensors")
    pipe = OneStepPipeline.from_pretrained(tmp_path / "g2")
    noise = torch.randn(3, 2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = (with_steps(generator)(noise) / 2 + 0.5).clamp(0, 1)
    for got in (
        pipe(batch_size=3, noise=noise, output_type="pt").images,  # all the noise given
        pipe(batch_size=3, generator=torch.Generator().manual_seed(1), output_type="pt").images,  # drawn alike
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(pipe(batch_size=3, noise=noise[:, 0], output_type="pt").images, want, atol=1e-3)


@pytest.fixture(scope="module")
def two_step_digits(tmp_path_factory):
    """A class-conditional 2-step digits generator: a short teacher, then a short distillation from it."""
    root = tmp_path_factory.mktemp("two-step")
    args = [*IMAGE_ARGS, "--set", "network.num_classes=10"]
    assert main(["teacher", *args, "--out", str(root / "teacher")]) == 0
    assert main(["distill", *args, "--set", "distill.sigma_g=[2.5, 0.6]", "--teacher", str(root / "teacher"),
                 "--out", str(root / "run")]) == 0  # fmt: skip
    return root / "run"


@pytest.mark.slow
def test_a_two_step_digits_run_exported_samples_in_plain_diffusers_as_disback_does(two_step_digits, tmp_path, capsys):
    from disback.storage.models import load_model

    assert main(["export", str(two_step_digits), "--out", str(tmp_path / "pipe")]) == 0
    config = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert config["sigma_g"] == [2.5, 0.6] and len(config["timestep"]) == 2
    # The pipeline's draws from its generator=: torch.randn(N, steps, C, H, W), sample i's start, then its fresh
    # noise; given the starting noise alone, it draws the fresh noise, N x (steps - 1) x C x H x W.
    labels = [3, 1, 4, 1]
    draws = torch.Generator().manual_seed(7)
    every = torch.randn(4, 2, 1, 8, 8, generator=draws)
    z, after = every[:, 0], torch.randn(4, 1, 1, 8, 8, generator=draws)
    generator, _ = load_model(two_step_digits / "generator.safetensors")
    with torch.no_grad():
        expected = [
            (generator(noise[:, 0], torch.tensor(labels), noise[:, 1:]) / 2 + 0.5).clamp(0, 1).numpy()
            for noise in (every, torch.cat([z[:, None], after], dim=1))
        ]
    np.save(tmp_path / "z.npy", z.numpy())
    script = (
        "import sys, numpy as np, torch\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r}, "
        f"custom_pipeline={str(tmp_path / 'pipe')!r}, trust_remote_code=True)\n"
        "draws = torch.Generator().manual_seed(7)\n"
        f"a = pipe(batch_size=4, generator=draws, output_type='pt', class_labels={labels}).images\n"
        f"z = torch.from_numpy(np.load({str(tmp_path / 'z.npy')!r}))\n"
        f"b = pipe(batch_size=4, noise=z, generator=draws, output_type='pt', class_labels={labels}).images\n"
        f"np.save({str(tmp_path / 'images.npy')!r}, torch.stack([a, b]).numpy())\n"
    )
    in_fresh_process(script, cwd=tmp_path)
    images = np.load(tmp_path / "images.npy")
    np.testing.assert_allclose(images[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(images[1], expected[1], atol=1e-5)
    assert np.abs(images[0] - images[1]).max() > 1e-3  # the second call's noise: the generator's next draws


@pytest.mark.slow
def test_eval_of_a_two_step_digits_run_is_fixed_by_its_seed_and_its_export_measures_the_same(
    two_step_digits, tmp_path, capsys
):
    from test_eval import scripted

    def value(target, *extra):
        out = tmp_path / f"e{len(list(tmp_path.glob('e*.json')))}.json"
        assert main(["eval", str(target), "--n", "40", "--quiet", *extra, "--out", str(out)]) == 0
        return json.loads(out.read_text())["value"]

    first = value(two_step_digits)
    assert np.isfinite(first) and value(two_step_digits, "--batch", "7") == pytest.approx(first, rel=1e-6)
    assert value(two_step_digits, "--seed", "1") != pytest.approx(first, rel=1e-6)
    # the exported pipeline draws sample i's noise of both steps as the generator file does
    ref = tmp_path / "refs"
    ref.mkdir()
    for i, image in enumerate((np.random.default_rng(2).random((40, 8, 8)) * 255).astype(np.uint8)):
        Image.fromarray(image).save(ref / f"{i}.png")
    assert main(["export", str(two_step_digits), "--out", str(tmp_path / "pipe")]) == 0
    common = ["--features", f"inception={scripted(tmp_path)}", "--ref", str(ref)]
    assert value(tmp_path / "pipe", *common, "--batch", "4") == pytest.approx(value(two_step_digits, *common), rel=1e-4)


@pytest.mark.slow
def test_demo_on_a_folder_of_images_it_has_never_seen(tmp_path, capsys):
    """Unlabelled RGB images of another size: resized to the preset, measured with a rotation-trained classifier."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        img = np.zeros((24, 24, 3), dtype=np.uint8)
        r, c = rng.integers(2, 14, size=2)
        img[r : r + 8, c : c + 8, rng.integers(3)] = 255
        Image.fromarray(img).save(folder / f"shape{i}.jpg" if i % 2 else folder / f"shape{i}.png")
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(folder), "--out", str(out), *IMAGE_ARGS]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["data"] == str(folder) and s["features"]["task"] == "rotation"
    assert np.load(out / "baseline" / "samples.npy").shape == (100, 1, 8, 8)
