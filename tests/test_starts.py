"""Starting from a generator or a fake score distilled before (--generator, --fake), in every accepted format, and
the start-far diagnostic."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from disback import stages
from disback.cli import main
from disback.config import build_config
from disback.data import load_data
from disback.errors import DisbackError
from disback.method.mismatch import mismatch_summary, score_mismatch
from disback.method.path import DegradationPath
from disback.storage.external import unet_of
from disback.storage.files import sha256_file
from disback.storage.models import load_model

DIGITS = {
    "data": {"n_eval": 64},
    "network": {"channels": [8, 16]},
    "teacher": {"steps": 40, "heun_steps": 4},
    "degrade": {"steps": 4, "nodes": 2, "batch": 16, "spacing": "steps", "plateau": 0.0},
    "distill": {"steps": 4, "batch": 16, "schedule": "fixed", "switch_every": 1},
    "eval": {"every": 4, "classifier_steps": 100},
}


def digits_config(**overrides):
    from disback.config import merge

    return build_config("digits", overrides=merge(DIGITS, overrides))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A digits teacher and a student: the generator of a 4-step baseline run, with its evaluation."""
    root = tmp_path_factory.mktemp("student")
    cfg = digits_config()
    data = load_data(cfg.data, cfg.seed)
    teacher = stages.train_teacher(cfg, data, root / "teacher", show_progress=False)
    result = stages.distill(cfg, data, teacher, None, root / "student", show_progress=False)
    return cfg, teacher, root / "student", result["records"][-1]


def formats(student_run, folder):
    """The student's generator in every accepted format, and the weights each holds (fp16 rounded for .bin)."""
    generator, _ = load_model(student_run / "generator.safetensors")
    unet = unet_of(generator, student_run)
    folder.mkdir()
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, folder / "unet_fp16.bin")  # as DMD2 publishes
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(folder / "unet.safetensors"))
    unet.save_pretrained(folder / "diffusers-unet")
    assert main(["export", str(student_run), "--out", str(folder / "pipeline")]) == 0
    return {
        "disback file": (student_run / "generator.safetensors", "disback"),
        "run folder": (student_run, "disback"),
        "fp16 .bin": (folder / "unet_fp16.bin", "state-dict"),
        ".safetensors state dict": (folder / "unet.safetensors", "state-dict"),
        "diffusers UNet folder": (folder / "diffusers-unet", "unet-folder"),
        "exported pipeline": (folder / "pipeline", "unet-folder"),
    }, unet.state_dict()


def test_degrade_starts_from_a_student_in_every_format(student, tmp_path):
    cfg, teacher, run, _ = student
    sources, weights = formats(run, tmp_path / "formats")
    for name, (source, fmt) in sources.items():
        path = stages.record_path(cfg, teacher, tmp_path / name, show_progress=False, generator=source)
        recorded = path.config["initial_generator"]
        assert recorded["origin"]["format"] == fmt, name
        if fmt == "disback":  # used where it is
            assert path.initial_generator == (run / "generator.safetensors").resolve()
            assert recorded["origin"]["sha256"] == sha256_file(run / "generator.safetensors")
            continue
        converted = load_file(str(path.initial_generator))  # once into the path folder, the origin in its header
        assert path.initial_generator.parent == tmp_path / name
        assert recorded["origin"]["sha256"] == sha256_file(recorded["origin"]["file"])
        unet = {k.split("unet.", 1)[1]: v for k, v in converted.items() if "unet." in k}
        half = name == "fp16 .bin"
        assert recorded["origin"]["dtype"] == (["float16"] if half else ["float32"])
        for key, value in weights.items():
            expected = value.half().float() if half else value
            assert unet[key].dtype == torch.float32 and torch.equal(unet[key], expected), (name, key)


def test_backtracking_and_the_baseline_start_where_the_student_ended(student, tmp_path):
    cfg, teacher, run, last = student
    data = load_data(cfg.data, cfg.seed)
    path = stages.record_path(cfg, teacher, tmp_path / "path", show_progress=False, generator=run)
    backtrack = stages.distill(cfg, data, teacher, path, tmp_path / "backtrack", show_progress=False)  # the path's own
    baseline = stages.distill(
        cfg, data, teacher, None, tmp_path / "baseline", show_progress=False, generator=run, fake=run
    )
    for result in (backtrack, baseline):  # same eval noise, same generator: the student's last evaluation
        assert result["records"][0]["fid"] == pytest.approx(last["fid"], rel=1e-6)
    assert backtrack["switches"] == [1]
    inputs = json.loads((tmp_path / "baseline" / "inputs.json").read_text())
    assert inputs["generator_sha256"] == sha256_file(run / "generator.safetensors")
    assert inputs["fake_sha256"] == sha256_file(run / "fake.safetensors")
    with pytest.raises(DisbackError, match="recorded toward the generator"):  # the path's generator is another one
        stages.distill(
            cfg, data, teacher, path, tmp_path / "other", show_progress=False, generator=tmp_path / "baseline"
        )
    teacher_path = stages.record_path(cfg, teacher, tmp_path / "teacher-path", show_progress=False)
    with pytest.raises(DisbackError, match="recorded toward the teacher's copy"):
        stages.distill(cfg, data, teacher, teacher_path, tmp_path / "other2", show_progress=False, generator=run)


def test_a_fake_score_from_a_unet_state_dict(student, tmp_path):
    cfg, teacher, run, _ = student
    fake, _ = load_model(run / "fake.safetensors")
    unet = unet_of(fake, run)
    torch.save(unet.state_dict(), tmp_path / "fake_unet.bin")
    data = load_data(cfg.data, cfg.seed)
    stages.distill(cfg, data, teacher, None, tmp_path / "run", show_progress=False, fake=tmp_path / "fake_unet.bin")
    converted = load_file(str(tmp_path / "run" / "initial-fake.safetensors"))
    assert converted.keys() == load_file(str(run / "fake.safetensors")).keys()
    assert all(torch.equal(converted[f"backbone.unet.{k}"], v) for k, v in unet.state_dict().items())


def test_a_fake_score_given_over_a_path_is_the_one_backtracking_starts_from(student, tmp_path):
    """With --fake, the fake score starts from the critic given, not from the path's last node (a learning rate of
    1e-12: it stays where it started, to within 1e-8)."""
    cfg, teacher, run, _ = student
    data = load_data(cfg.data, cfg.seed)
    path = stages.record_path(cfg, teacher, tmp_path / "path", show_progress=False)
    assert len(path) > 1
    frozen = digits_config(distill={"lr_fake": 1e-12})
    stages.distill(frozen, data, teacher, path, tmp_path / "run", show_progress=False, fake=run)
    given, last = load_file(str(run / "fake.safetensors")), load_file(str(path.root / path.nodes[-1].file))
    ended = load_file(str(tmp_path / "run" / "fake.safetensors"))
    assert ended.keys() == given.keys()
    assert all(torch.allclose(ended[k], given[k], rtol=0, atol=1e-8) for k in given)
    assert not all(torch.allclose(ended[k], last[k], rtol=0, atol=1e-6) for k in last if k in ended)


def test_a_sharded_diffusers_unet_folder_is_read_whole(student, tmp_path):
    """save_pretrained shards a UNet above max_shard_size (an fp32 SDXL UNet at the 10 GB default)."""
    cfg, teacher, run, _ = student
    generator, _ = load_model(run / "generator.safetensors")
    unet = unet_of(generator, run)
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    path = stages.record_path(cfg, teacher, tmp_path / "path", show_progress=False, generator=tmp_path / "sharded")
    origin = path.config["initial_generator"]["origin"]
    assert origin["file"].endswith(".index.json") and len(origin["shards"]) > 1
    converted = load_file(str(tmp_path / "path" / "initial-generator.safetensors"))
    assert all(torch.equal(converted[f"denoiser.backbone.unet.{k}"], v) for k, v in unet.state_dict().items())
    # the recorded sha256 identifies the weights, not the index (which is the same for any UNet of this architecture)
    from disback.storage.external import read_start

    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)
    unet.save_pretrained(tmp_path / "other", max_shard_size="20KB")
    unet.half().save_pretrained(tmp_path / "fp16", max_shard_size="20KB", variant="fp16")
    assert (tmp_path / "other" / "diffusion_pytorch_model.safetensors.index.json").read_bytes() == (
        tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    ).read_bytes()
    assert read_start(tmp_path / "other", "generator").origin["sha256"] != origin["sha256"]
    fp16 = read_start(tmp_path / "fp16", "generator")  # diffusers' variant names: ...safetensors.index.fp16.json
    assert fp16.origin["file"].endswith("index.fp16.json") and fp16.origin["dtype"] == ["float16"]


class NotATensor:
    pass


def test_bad_starts_are_refused_before_anything_is_written(student, tmp_path, capsys):
    cfg, teacher, run, _ = student
    args = ["degrade", "--preset", "digits", "--teacher", str(teacher), "--quiet", "--set", "network.channels=[8, 16]"]
    with open(tmp_path / "pickled.bin", "wb") as fh:  # not tensors: refused by weights_only, never run
        pickle.dump({"conv_in.weight": NotATensor()}, fh)
    (tmp_path / "junk.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    generator, _ = load_model(run / "generator.safetensors")
    unet = unet_of(generator, run)
    other = {k: v for k, v in unet.state_dict().items() if not k.startswith("conv_out")}
    other["conv_in.weight"] = torch.zeros(8, 3, 3, 3)  # 3 channels, not 1
    torch.save(other, tmp_path / "other.bin")
    torch.save(
        {"real_unet.conv_in.weight": torch.zeros(1), "fake_unet.conv_in.weight": torch.zeros(1)},
        tmp_path / "guidance.bin",
    )
    from diffusers import UNet2DModel

    bigger = UNet2DModel.from_config({**unet.config, "sample_size": 16})
    bigger.save_pretrained(tmp_path / "bigger")
    points = tmp_path / "points"  # a generator of 2-D points: another teacher's
    assert (
        main(
            ["teacher", "--out", str(points / "t"), "--quiet", "--set", "teacher.steps=5", "--set", "network.hidden=16"]
        )
        == 0
    )
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(points / "t"),
                "--out",
                str(points / "g"),
                "--quiet",
                "--set",
                "distill.steps=1",
                "--set",
                "network.hidden=16",
                "--set",
                "data.n_eval=20",
            ]
        )
        == 0
    )
    capsys.readouterr()
    cases = [
        (tmp_path / "pickled.bin", "pickled.bin is not a state dict of tensors that can be read safely"),
        (tmp_path / "junk.bin", "junk.bin is not a state dict of tensors that can be read safely"),
        (
            tmp_path / "other.bin",
            r"other.bin does not match the model: 2 missing keys \(e.g. \['conv_out.bias', 'conv_out.weight'\]\)"
            r".*shape mismatch \(conv_in.weight: file \(8, 3, 3, 3\)",
        ),
        (tmp_path / "guidance.bin", "holds several networks .keys under fake_unet., real_unet."),
        (tmp_path / "bigger", r"another architecture than the teacher's \(sample_size: 16 here, 8 for the teacher\)"),
        (points / "g", r"has shape \[2\] and the teacher \[1, 8, 8\]"),
        (run / "fake.safetensors", "is a denoiser, and a generator is wanted here"),
        (tmp_path / "missing.bin", "missing.bin does not exist"),
    ]
    for i, (source, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main([*args, "--generator", str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert __import__("re").search(message, err), (source, err)
        assert not out.exists()  # nothing written
    assert main([*args, "--generator", str(run), "--set", "distill.sigma_g=80", "--out", str(tmp_path / "sg")]) == 2
    assert "set --set distill.sigma_g=2.5" in capsys.readouterr().err
    # the same checks for --fake, for distill and demo, and before --overwrite deletes the old run
    settings = ["--preset", "digits", "--quiet", "--set", "network.channels=[8, 16]", "--set", "distill.steps=1"]
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "config.yaml").write_text("{}")  # a folder disback wrote: --overwrite may delete it
    for command, extra in (
        (["distill", "--teacher", str(teacher)], []),
        (["demo", "--teacher", str(teacher)], []),
        (["distill", "--teacher", str(teacher)], ["--overwrite"]),
        (["demo", "--teacher", str(teacher)], ["--overwrite"]),
    ):
        for option, source, message in (
            ("--fake", tmp_path / "other.bin", "other.bin does not match the model"),
            ("--fake", run / "generator.safetensors", "is a generator, and a denoiser is wanted here"),
            ("--generator", tmp_path / "junk.bin", "junk.bin is not a state dict of tensors"),
        ):
            out = kept if extra else tmp_path / "new"
            assert main([*command, *settings, option, str(source), "--out", str(out), *extra]) == 2, command
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (command, err)
            assert (kept / "config.yaml").is_file() if extra else not out.exists(), (command, extra)


def test_score_mismatch_is_one_on_data_and_grows_off_it():
    from disback.config import EDMConfig

    class Gaussian(torch.nn.Module):  # the exact denoiser of N(0, I)
        def forward(self, x, sigma, labels=None):
            return x / (1 + sigma.reshape(-1, 1) ** 2)

    edm = EDMConfig(sigma_data=1.0, sigma_min=0.002, sigma_max=80.0, rho=7.0, p_mean=-1.2, p_std=1.2)
    data = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    same = score_mismatch(Gaussian(), data, data, edm)
    assert same["ratio"] == [1.0] * 4 and mismatch_summary(same) == 1.0
    far = score_mismatch(Gaussian(), data * 0.1 + 3.0, data, edm)  # collapsed and shifted
    assert (
        far["ratio"][-1] > 1.5  # at large noise levels the denoiser pulls samples toward its mean
        and mismatch_summary(far) > mismatch_summary(score_mismatch(Gaussian(), data + 0.5, data, edm)) > 1
    )
    assert score_mismatch(Gaussian(), data, None, edm)["ratio"] is None


def test_the_demo_reports_the_start_far_diagnostic(tmp_path, capsys):
    from conftest import TINY_ARGS

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY_ARGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    far = summary["start_far"]
    assert len(far["bands"]) == len(far["generator"]) == len(far["data"]) == len(far["ratio"]) == 4
    assert far["path_distance"] == DegradationPath.load(out / "path").nodes[-1].distance > 0
    assert np.allclose(far["ratio"], np.array(far["generator"]) / np.array(far["data"]))
    report = (out / "report.md").read_text()
    assert "How far the generator starts from the teacher" in report and "total distance from the teacher" in report
    again = tmp_path / "again"  # the demo from the first one's teacher and its baseline generator
    assert (
        main(
            [
                "demo",
                "--out",
                str(again),
                "--teacher",
                str(out / "teacher"),
                "--generator",
                str(out / "baseline"),
                *TINY_ARGS,
            ]
        )
        == 0
    )
    second = json.loads((again / "summary.json").read_text())
    assert second["budgets"]["initial_generator"] == str(out / "baseline")
    assert second["runs"]["baseline"]["curve"][0]["swd"] == pytest.approx(summary["runs"]["baseline"]["final"]["swd"])
    assert (
        DegradationPath.load(again / "path").initial_generator == (out / "baseline" / "generator.safetensors").resolve()
    )
