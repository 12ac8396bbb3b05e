"""EDM and EDM2 snapshots as teachers and starts, end to end: tiny networks written in NVIDIA's snapshot layout, read
without running their code, distilled by `disback demo`, exported to a folder that samples without disback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from disback import load_denoiser
from disback.cli import main
from disback.diffusion.preconditioners import build_precond
from disback.errors import DisbackError
from disback.storage.models import load_model
from snapshot_writer import Call, write_snapshot

# Tiny networks of each family, with EDM's argument names (what a snapshot's _init_kwargs holds).
SONG = dict(
    img_resolution=16,
    img_channels=3,
    label_dim=0,
    model_type="SongUNet",
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)
ADM = dict(
    img_resolution=16,
    img_channels=3,
    label_dim=5,
    use_fp16=True,
    model_type="DhariwalUNet",
    model_channels=64,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)
NCSN = dict(
    SONG,
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    decoder_type="skip",
    resample_filter=[1, 3, 3, 1],
)
EDM2 = dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=32, channel_mult=[1, 2], num_blocks=1)
# Class names NVIDIA's code records for modules that disback splits into two classes.
EDM_NAMES = {"ResampleConv2d": "Conv2d"}
SHORT = [
    "--set", "teacher.heun_steps=4", "--set", "degrade.steps=4", "--set", "degrade.nodes=2", "--set",
    "degrade.batch=4", "--set", "degrade.spacing=steps", "--set", "degrade.plateau=0", "--set", "distill.steps=4",
    "--set", "distill.batch=4", "--set", "distill.switch_every=1", "--set", "distill.schedule=fixed", "--set",
    "eval.every=2", "--set", "data.n_eval=12", "--set", "eval.classifier_steps=20", "--quiet",
]  # fmt: skip


def snapshot(path: Path, precond: str, kwargs: dict, seed: int = 0, **options) -> tuple[Path, torch.nn.Module]:
    """A tiny network with random weights, written as NVIDIA's training loop writes its snapshots."""
    torch.manual_seed(seed)
    net = build_precond(precond, kwargs)
    with torch.no_grad():  # nonzero everywhere (EDM zero-initialises its output layers)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    names = {n: EDM_NAMES[type(m).__name__] for n, m in net.named_modules() if type(m).__name__ in EDM_NAMES}
    write_snapshot(path, net, precond, kwargs, class_names=names, edm2=precond == "Precond", **options)
    return path, net


def image_folder(path: Path, n: int = 40, size: int = 24) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


def call(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None):
    with torch.no_grad():
        return net(x, sigma, labels)


@pytest.mark.parametrize(
    "precond,kwargs",
    [
        ("EDMPrecond", SONG),
        ("EDMPrecond", ADM),
        ("VPPrecond", SONG),
        ("VEPrecond", NCSN),
        ("iDDPMPrecond", {**ADM, "use_fp16": False}),
        ("Precond", EDM2),
    ],
)
def test_load_denoiser_reproduces_the_snapshot_network(tmp_path, precond, kwargs):
    file, net = snapshot(tmp_path / "net.pkl", precond, kwargs)
    loaded = load_denoiser(file)
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 20.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 4]), 5).float() if kwargs["label_dim"] else None
    want = call(net.to(torch.float16).float() if precond == "Precond" else net, x, sigma, labels)
    got = call(loaded, x, sigma, labels)
    assert got.shape == x.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert list(loaded.state_dict()) == list(net.state_dict())  # the checkpoint's own names and order


def test_teacher_from_a_snapshot_then_a_short_demo_export_and_sampling_without_disback(tmp_path, capsys):
    file, net = snapshot(tmp_path / "edm.pkl", "EDMPrecond", SONG)
    data = image_folder(tmp_path / "images")  # 24x24 images: read at the teacher's 16x16
    assert main(["teacher", "--pretrained", str(file), "--data", str(data), "--preset", "digits", *SHORT,
                 "--out", str(tmp_path / "t")]) == 0  # fmt: skip
    teacher, meta = load_model(tmp_path / "t" / "teacher.safetensors")
    assert meta.kind == "nvlabs" and meta.shape == [3, 16, 16] and meta.spec["precond"] == "EDMPrecond"
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0])
    torch.testing.assert_close(call(teacher, x, sigma), call(net, x, sigma), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call(load_denoiser(tmp_path / "t"), x, sigma), call(net, x, sigma), rtol=1e-5, atol=1e-6)
    out = tmp_path / "demo"
    assert main(["demo", "--pretrained", str(file), "--data", str(data), "--preset", "digits", *SHORT,
                 "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["disback"]["switches"] and np.isfinite(summary["runs"]["baseline"]["final"]["fid"])
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    assert main(["sample", str(out / "disback" / "generator.safetensors"), "--n", "6", "--out",
                 str(tmp_path / "s.npy")]) == 0  # fmt: skip
    # a 2-step generator from the same teacher: config.json holds its levels, generate.py rolls them out
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--data", str(data), "--preset", "digits", *SHORT,
                 "--set", "distill.sigma_g=[2.5, 0.6]", "--out", str(tmp_path / "two")]) == 0  # fmt: skip
    assert main(["export", str(tmp_path / "two"), "--out", str(tmp_path / "export-two")]) == 0
    assert json.loads((tmp_path / "export-two" / "config.json").read_text())["sigma_g"] == [2.5, 0.6]
    assert main(["sample", str(tmp_path / "two" / "generator.safetensors"), "--n", "6", "--out",
                 str(tmp_path / "s2.npy")]) == 0  # fmt: skip
    # in a fresh process where disback cannot be imported: the folders' own code and weights
    code = (
        "import sys; sys.modules['disback'] = None; sys.path.insert(0, sys.argv[1])\n"
        "import numpy as np, torch\nfrom generate import load, generate\n"
        "for folder, file in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    net, config = load(folder); np.save(file, generate(net, config, 6, seed=0, batch=4))\n"
    )
    folders = [tmp_path / "export", tmp_path / "g.npy", tmp_path / "export-two", tmp_path / "g2.npy"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, folders)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for run, name in ((out / "disback", ""), (tmp_path / "two", "2")):
        images = np.load(tmp_path / f"g{name}.npy")
        assert images.shape == (6, 3, 16, 16) and images.dtype == np.uint8
        generator, meta = load_model(run / "generator.safetensors")
        # generate.py's draws: torch.randn(n, steps, *shape), image i's start and then its fresh noise of each step
        noise = torch.randn(6, generator.steps, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = ((generator(noise[:, 0], None, noise[:, 1:]).clamp(-1, 1) + 1) * 127.5).round()
        assert (ours.numpy() - images).__abs__().max() <= 1  # the same images, up to rounding at .5
        assert np.abs(np.load(tmp_path / f"s{name}.npy") * 255 - images).max() <= 1  # as `disback sample --seed 0`
    state = torch.load(tmp_path / "export" / "pytorch_model.bin", weights_only=True)
    assert list(state) == list(net.state_dict())  # EDM's key names, for EDM's own EDMPrecond


def test_starts_from_a_sid_snapshot_or_a_dmd2_state_dict_and_refuses_other_architectures(tmp_path, capsys):
    teacher, _ = snapshot(tmp_path / "teacher.pkl", "EDMPrecond", ADM)
    data = image_folder(tmp_path / "images")
    args = ["--pretrained", str(teacher), "--data", str(data), "--preset", "digits", *SHORT]
    sid, student = snapshot(tmp_path / "sid.pkl", "EDMPrecond", ADM, seed=1)  # SiD saves its generator so
    out = tmp_path / "sid-run"
    assert main(["demo", *args, "--generator", str(sid), "--set", "distill.sigma_g=2.5", "--out", str(out)]) == 0
    start, meta = load_model(out / "initial-generator.safetensors")
    assert meta.origin["format"] == "edm-snapshot"
    torch.testing.assert_close(start.denoiser.state_dict()["model.out_conv.weight"], student.model.out_conv.weight)
    torch.save(student.state_dict(), tmp_path / "pytorch_model.bin")  # DMD2's ImageNet generator format
    assert main(["demo", *args, "--generator", str(tmp_path / "pytorch_model.bin"), "--out", str(tmp_path / "d")]) == 0
    other, _ = snapshot(tmp_path / "other.pkl", "EDMPrecond", {**ADM, "model_channels": 32})
    capsys.readouterr()
    assert main(["demo", *args, "--generator", str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "other.pkl does not match the model" in err and "shape mismatch" in err
    assert not (tmp_path / "x").exists()


def test_a_snapshot_carrying_code_is_refused_without_running_it(tmp_path, capsys):
    marker, payload = tmp_path / "module-src-ran", tmp_path / "payload-ran"
    file, _ = snapshot(
        tmp_path / "evil.pkl", "EDMPrecond", SONG, marker=marker, payload=Call(Path.write_text, (payload, "x"))
    )
    assert main(["teacher", "--pretrained", str(file), "--preset", "digits", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil.pkl" in err and "refus" in err
    assert not marker.exists() and not payload.exists() and not (tmp_path / "t").exists()
    clean, _ = snapshot(tmp_path / "clean.pkl", "EDMPrecond", SONG, marker=marker)
    load_denoiser(clean)
    assert not marker.exists()  # its embedded module source is never executed


def test_a_snapshot_by_url_is_downloaded_once_and_checked(tmp_path):
    import hashlib
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    file, net = snapshot(served / "net.pkl", "EDMPrecond", SONG)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/net.pkl"
        with pytest.raises(DisbackError, match="not the 000000000000... asked for"):
            load_denoiser(f"{url}#sha256={'0' * 64}")
        loaded = load_denoiser(f"{url}#sha256={digest}")
        x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0])
        torch.testing.assert_close(call(loaded, x, sigma), call(net, x, sigma), rtol=1e-5, atol=1e-6)
    finally:
        server.shutdown()


def test_edm2_teacher_trains_with_full_copies_and_refuses_lora_clearly(tmp_path, capsys):
    file, _ = snapshot(tmp_path / "edm2.pkl", "Precond", EDM2)
    data = image_folder(tmp_path / "images")
    args = ["--pretrained", str(file), "--data", str(data), "--preset", "digits", *SHORT]
    assert main(["demo", *args, "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    assert main(["demo", *args, "--set", "network.lora_rank=4", "--out", str(tmp_path / "lora")]) == 2
    assert "has no linear or convolution layers that LoRA adapts" in capsys.readouterr().err


def test_dmd2_with_an_edm_dataset_zip_on_a_class_conditional_teacher_with_lora(tmp_path):
    """dmd2's GAN term on EDM's networks: real images and their labels from an EDM dataset zip, a LoRA fake score and
    LoRA nodes on an ADM teacher, classes drawn for the generator; then disback eval on the run."""
    from test_images import edm_zip

    file, _ = snapshot(tmp_path / "adm.pkl", "EDMPrecond", ADM)
    data = edm_zip(tmp_path / "data.zip", 40, size=20)
    out = tmp_path / "run"
    args = ["demo", "--pretrained", str(file), "--data", str(data), "--preset", "digits", *SHORT, "--out", str(out)]
    assert main([*args, "--method", "dmd2", "--set", "distill.fake_updates=2", "--set", "network.lora_rank=2"]) == 0
    path = json.loads((out / "path" / "manifest.json").read_text())
    assert path["config"]["network"]["lora_rank"] == 2
    assert main(["eval", str(out), "--n", "24", "--batch", "8", "--quiet"]) == 0
    assert json.loads((out / "eval.json").read_text())["value"] >= 0


def test_a_killed_distillation_on_an_edm_teacher_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    file, _ = snapshot(tmp_path / "edm.pkl", "EDMPrecond", SONG)
    data = image_folder(tmp_path / "images")
    common = ["--pretrained", str(file), "--data", str(data), "--preset", "digits", *SHORT]
    assert main(["teacher", *common, "--out", str(tmp_path / "t")]) == 0
    run = ["distill", "--teacher", str(tmp_path / "t"), "--data", str(data), "--preset", "digits", *SHORT]
    run += ["--set", "distill.steps=6", "--set", "run.checkpoint_every=2"]
    assert main([*run, "--out", str(tmp_path / "a")]) == 0
    assert main([*run, "--out", str(tmp_path / "b")]) == 0
    (tmp_path / "b" / "result.json").unlink()  # as if killed after its step-4 checkpoint
    (tmp_path / "b" / "generator.safetensors").unlink()
    index = json.loads((tmp_path / "b" / "checkpoints" / "index.json").read_text())
    index["checkpoints"] = [c for c in index["checkpoints"] if c["step"] <= 4]
    (tmp_path / "b" / "checkpoints" / "index.json").write_text(json.dumps(index))
    assert main([*run, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (load_file(str(tmp_path / r / "generator.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
