"""The field's measures: Inception FID as NVlabs/edm computes it (on a scripted stand-in with Inception's calling
convention), reference statistics, `disback eval`, trackers and log-friendly progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import TINY_ARGS
from disback.cli import main
from disback.errors import DisbackError
from disback.metrics.images import ImageMetrics, frechet_distance, reference_stats, statistics
from disback.metrics.inception import InceptionFeatures, fetch

DIGITS_ARGS = [
    "--preset", "digits", "--quiet", "--set", "data.n_eval=100", "--set", "teacher.steps=60", "--set", "teacher.heun_steps=4",
    "--set", "degrade.steps=8", "--set", "degrade.nodes=4", "--set", "distill.steps=12", "--set", "distill.batch=32",
    "--set", "distill.switch_every=3", "--set", "eval.every=6", "--set", "network.channels=[8, 16]",
    "--set", "eval.classifier_steps=300",
]  # fmt: skip


class StandIn(nn.Module):
    """Inception's calling convention (uint8 N x 3 x H x W; ``return_features=True`` gives the pool features)."""

    def __init__(self, dimension: int = 2048):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 4 * 4, dimension)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8 and img.shape[1] == 3
        features = torch.tanh(self.proj(nn.functional.adaptive_avg_pool2d(img.float() / 255.0, 4).flatten(1)))
        return features if return_features else features[:, :1008]


def scripted(folder, dimension: int = 2048):
    file = folder / f"inception-{dimension}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated but still how this network is published
        torch.jit.script(StandIn(dimension)).save(str(file))
    return file


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert main(["demo", "--out", str(root / "demo"), *DIGITS_ARGS]) == 0
    assert main(["export", str(root / "demo"), "--out", str(root / "pipeline")]) == 0
    return root


def test_inception_fid_is_zero_on_its_own_statistics_grows_with_a_shift_and_matches_scipy(tmp_path):
    from scipy.linalg import sqrtm

    net = InceptionFeatures(*fetch(str(scripted(tmp_path)), tmp_path))
    rng = np.random.default_rng(0)
    images = rng.random((300, 1, 8, 8)).astype(np.float32)
    metrics = ImageMetrics(images, net, net.info)
    assert metrics(images)["fid"] == pytest.approx(
        0.0, abs=1e-4
    )  # 2048-d from 300 images: rounding of a rank-300 matrix
    shifts = [metrics(np.clip(images + s, 0, 1))["fid"] for s in (0.05, 0.2)]
    assert 0 < shifts[0] < shifts[1]
    a = net(torch.as_tensor(np.clip(images + 0.2, 0, 1))).double().numpy()
    (m1, c1), (m2, c2) = statistics(a), metrics.ref_stats
    expected = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(sqrtm(c1 @ c2)))
    assert shifts[1] == pytest.approx(expected, rel=1e-5)
    x = torch.as_tensor(images[:4])  # grayscale repeated to 3 channels, as uint8, as EDM's fid.py feeds it
    assert torch.equal(net(x), net(x.repeat(1, 3, 1, 1)))


def test_running_statistics_equal_numpys_over_all_samples_at_once():
    from disback.metrics.images import RunningStatistics

    features = np.random.default_rng(0).normal(3.0, 2.0, (101, 5))
    running = RunningStatistics()
    for i in range(0, 101, 17):
        running.add(features[i : i + 17])
    mu, sigma = running.value()
    assert np.allclose(mu, features.mean(0), atol=1e-12) and np.allclose(sigma, np.cov(features, rowvar=False))
    with pytest.raises(DisbackError, match="at least 2 samples"):
        RunningStatistics().value()


def test_reference_statistics_round_trip_and_bad_ones_are_refused(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    m, s = reference_stats(tmp_path / "ref.npz", 4)
    assert np.array_equal(m, mu) and np.array_equal(s, sigma)
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(DisbackError, match="other.npz holds mean, not the reference statistics 'mu' and 'sigma'"):
        reference_stats(tmp_path / "other.npz")
    with pytest.raises(
        DisbackError, match="ref.npz holds statistics of 4-d features, and the feature network gives 2048"
    ):
        reference_stats(tmp_path / "ref.npz", 2048)
    assert frechet_distance(m, s, m, s) == pytest.approx(0, abs=1e-9)


def test_a_feature_file_that_is_not_inception_is_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(DisbackError, match="junk.pt is not a TorchScript network"):
        InceptionFeatures(*fetch(str(tmp_path / "junk.pt"), tmp_path))
    with pytest.raises(DisbackError, match=r"inception-64.pt returns features of shape \(64,\).*not \(2048,\)"):
        InceptionFeatures(*fetch(str(scripted(tmp_path, 64)), tmp_path))
    with pytest.raises(DisbackError, match="missing.pt does not exist"):
        fetch(str(tmp_path / "missing.pt"), tmp_path)


def test_eval_on_a_points_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), *TINY_ARGS]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "demo"), "--n", "500", "--quiet"]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert record["measure"] == "swd" and record["n"] == 500 and record["seed"] == 0 and record["value"] > 0
    assert {"time_s", "network", "reference", "results"} <= record.keys()
    assert out.count("\n") == 1 and out.startswith("swd ") and "500 samples" in out


def test_eval_on_a_digits_run_with_the_classifier_and_with_inception(digits_run, tmp_path, capsys):
    demo = digits_run / "demo"
    assert main(["eval", str(demo), "--n", "200", "--quiet"]) == 0
    classifier = json.loads((demo / "eval.json").read_text())
    assert classifier["measure"] == "fid" and "not Inception FID" in classifier["network"]["name"]
    assert classifier["network"]["sha256"]  # the cached classifier's file
    net = scripted(tmp_path)
    assert (
        main(
            [
                "eval",
                str(demo),
                "--n",
                "200",
                "--quiet",
                "--features",
                f"inception={net}",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "biased" in err  # 200 samples of 2048-d features
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["network"]["name"] == "inception" and record["network"]["file"] == str(net)
    assert record["network"]["sha256"] == __import__("hashlib").sha256(net.read_bytes()).hexdigest()
    # the exported pipeline against reference images: statistics computed once, cached, and the same when reused
    np.savez(tmp_path / "refimages.npz", images=(np.random.default_rng(1).random((64, 8, 8)) * 255).astype(np.uint8))
    args = ["eval", str(digits_run / "pipeline"), "--n", "64", "--quiet", "--features", f"inception={net}"]
    assert main([*args, "--ref", str(tmp_path / "refimages.npz"), "--out", str(tmp_path / "p1.json")]) == 0
    first = json.loads((tmp_path / "p1.json").read_text())
    cached = first["reference"]["stats"]
    assert "saved to" in capsys.readouterr().err and os.path.isfile(cached)
    assert main([*args, "--ref", cached, "--out", str(tmp_path / "p2.json")]) == 0
    assert json.loads((tmp_path / "p2.json").read_text())["value"] == pytest.approx(first["value"], rel=1e-9)
    np.savez(tmp_path / "small.npz", mu=np.zeros(4), sigma=np.eye(4))
    assert main([*args, "--ref", str(tmp_path / "small.npz")]) == 2
    assert "small.npz holds statistics of 4-d features" in capsys.readouterr().err
    assert main(["eval", str(digits_run / "pipeline"), "--n", "8", "--quiet"]) == 2  # no data to compare with
    assert "give --ref" in capsys.readouterr().err


def test_eval_streams_batches_balances_classes_and_checks_inputs_before_drawing(digits_run, tmp_path, capsys):
    demo, pipeline, net = digits_run / "demo", digits_run / "pipeline", scripted(tmp_path)
    ref = tmp_path / "refs"
    ref.mkdir()
    rng = np.random.default_rng(2)
    for i in range(40):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(ref / f"{i}.png")
    common = ["--n", "30", "--quiet", "--features", f"inception={net}", "--ref", str(ref)]
    values = {}
    for name, target, batch in (("run", demo, "30"), ("run-b7", demo, "7"), ("pipeline-b4", pipeline, "4")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(target), *common, "--batch", batch, "--out", str(out)]) == 0
        values[name] = json.loads(out.read_text())["value"]
    # sample i has the same noise and class whatever the batch: the statistics, summed batch by batch, agree; the
    # exported pipeline draws the same classes (10 of them, 4 per batch) as the generator file
    assert values["run-b7"] == pytest.approx(values["run"], rel=1e-6)
    assert values["pipeline-b4"] == pytest.approx(values["run"], rel=1e-4)
    capsys.readouterr()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(ref / "0.png")  # a replaced image: a new reference
    assert main(["eval", str(demo), *common, "--out", str(tmp_path / "new.json")]) == 0
    assert "saved to" in capsys.readouterr().err
    assert json.loads((tmp_path / "new.json").read_text())["value"] != pytest.approx(values["run"], rel=1e-9)
    # a billion samples: every bad input is refused before the first one is drawn
    huge = ["eval", str(demo), "--n", "1000000000", "--quiet"]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for extra, message in (
        (["--features", f"inception={tmp_path / 'junk.pt'}"], "junk.pt is not a TorchScript network"),
        (["--features", f"inception={net}", "--ref", str(tmp_path / "none.npz")], "none.npz does not exist"),
        (["--features", "classifier", "--ref", str(tmp_path / "none")], "none does not exist"),
    ):
        assert main([*huge, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", str(pipeline), "--n", "1000000000", "--quiet", "--ref", str(ref)]) == 2
    assert "give --features inception=FILE" in capsys.readouterr().err
    assert main(["eval", str(demo), "--n", "1", "--quiet"]) == 2
    assert "needs at least 2 samples" in capsys.readouterr().err


def test_inception_fid_in_the_training_loop(digits_run, tmp_path):
    """eval.features=inception=FILE: the loop's fid is Inception FID of its samples against the held-out images, and
    the report says so (not "NOT Inception FID")."""
    from disback.config import build_config
    from disback.data import load_data
    from disback.jobs.report import features_note

    net = scripted(tmp_path)
    out = tmp_path / "run"
    spec = f"eval.features=inception={net}"
    args = ["distill", "--teacher", str(digits_run / "demo" / "teacher"), "--out", str(out), *DIGITS_ARGS]
    assert main([*args, "--set", spec]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = build_config("digits", overrides={"data": {"n_eval": 100}})
    reference = load_data(cfg.data, cfg.seed).reference
    features = InceptionFeatures(*fetch(str(net), tmp_path))
    expected = ImageMetrics(reference, features, features.info)(np.load(out / "samples.npy"))["fid"]
    assert records[-1]["fid"] == pytest.approx(expected, rel=1e-5)
    note = features_note(features.info, 100)
    assert "is Inception FID" in note and "NOT" not in note and features.sha256[:12] in note


class NoFeatures(nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean((2, 3))


def test_inception_by_url_is_downloaded_once_and_checked(tmp_path, caplog):
    import hashlib
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    net = scripted(served)
    digest = hashlib.sha256(net.read_bytes()).hexdigest()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{net.name}"
        with pytest.raises(DisbackError, match="downloaded with sha256 .*, not the 000000000000... asked for"):
            fetch(f"{url}#sha256={'0' * 64}", tmp_path / "cache")
        file, sha = fetch(f"{url}#sha256={digest}", tmp_path / "cache")
        assert sha == digest and file.read_bytes() == net.read_bytes() and file.parent == tmp_path / "cache"
        net.unlink()  # cached: not downloaded again
        assert fetch(f"{url}#sha256={digest}", tmp_path / "cache") == (file, digest)
        assert fetch(url, tmp_path / "cache")[1] == digest  # no fragment: recorded, with a warning
        assert "not verified" in caplog.text
        other = f"http://127.0.0.1:{server.server_port}/elsewhere/{net.name}"  # same file name, another URL
        with pytest.raises(DisbackError, match="cannot download"):
            fetch(other, tmp_path / "cache")
        old = tmp_path / "old-cache"  # a file cached by its bare name is still used
        old.mkdir()
        (old / net.name).write_bytes(file.read_bytes())
        assert fetch(f"{url}#sha256={digest}", old) == (old / net.name, digest)
    finally:
        server.shutdown()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(NoFeatures()).save(str(tmp_path / "nofeatures.pt"))
    with pytest.raises(DisbackError, match="nofeatures.pt cannot be called as Inception is"):
        InceptionFeatures(*fetch(str(tmp_path / "nofeatures.pt"), tmp_path))


def test_trackers_get_the_metrics_and_a_missing_package_says_what_to_install(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = tmp_path / "teacher"
    assert main(["teacher", "--out", str(t), *TINY_ARGS, "--set", "teacher.steps=20"]) == 0
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(t),
                "--out",
                str(tmp_path / "d"),
                *TINY_ARGS,
                "--set",
                "run.log_with=tensorboard",
            ]
        )
        == 0
    )
    events = list((tmp_path / "d" / "tensorboard" / "distill").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    records = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert {"swd", "mmd", "loss_generator", "loss_fake", "wall_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("swd")] == [r["iteration"] for r in records]
    assert acc.Scalars("swd")[-1].value == pytest.approx(records[-1]["swd"], rel=1e-6)
    import yaml  # the resolved config, as the tracker's hyperparameters

    (hparams,) = (tmp_path / "d" / "tensorboard" / "distill").rglob("hparams.yml")
    stored, resolved = yaml.safe_load(hparams.read_text()), yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())
    assert stored["run.log_with"] == "tensorboard" and stored["distill.steps"] == resolved["distill"]["steps"]
    assert stored["distill.method"] == resolved["distill"]["method"] and stored["seed"] == resolved["seed"]
    if __import__("importlib").util.find_spec("wandb") is None:
        assert main(["distill", "--teacher", str(t), "--out", str(tmp_path / "w"), "--set", "run.log_with=wandb"]) == 2
        assert "run.log_with=wandb needs the wandb package: pip install wandb" in capsys.readouterr().err


def test_a_redirected_run_logs_lines_not_a_progress_bar(tmp_path):
    """Output that is not a terminal (a cluster job, nohup, CI) gets one line per evaluation, no carriage returns."""
    args = [a for a in TINY_ARGS if a != "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "disback", "teacher", "--out", str(tmp_path / "t"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("teacher: ")]
    assert 15 <= len(lines) <= 25  # an evaluation every 15 of 300 steps (and a line a minute, if it took minutes)
    assert lines[-1].startswith("teacher: 300/300 (100%)")


def test_eval_ref_gives_the_loop_fixed_reference_statistics(tmp_path):
    """eval.ref: the loop's Fréchet distance is against given statistics (EDM's FID refs), not the held-out images."""
    from disback.config import build_config
    from disback.data import load_data
    from disback.metrics import build_metrics

    cfg = build_config("digits", overrides={"data": {"n_eval": 100}})
    data = load_data(cfg.data, cfg.seed)
    net = scripted(tmp_path)
    features = InceptionFeatures(*fetch(str(net), tmp_path))
    mu, sigma = statistics(ImageMetrics(data.reference, features, features.info).embed(data.train[:300]))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    metrics = build_metrics(data, 8, f"inception={net}", reference=str(tmp_path / "ref.npz"))
    samples = data.reference[:100]
    expected = frechet_distance(*statistics(metrics.embed(samples)), mu, sigma)
    assert metrics(samples)["fid"] == pytest.approx(expected, rel=1e-9)
    assert metrics.info["reference"] == str(tmp_path / "ref.npz")
    np.savez(tmp_path / "small.npz", mu=mu[:4], sigma=sigma[:4, :4])
    with pytest.raises(DisbackError, match="statistics of 4-d features, and the feature network gives 2048"):
        build_metrics(data, 8, f"inception={net}", reference=str(tmp_path / "small.npz"))
    with pytest.raises(DisbackError, match="reference statistics .*none.npz does not exist"):
        build_metrics(data, 8, f"inception={net}", reference=str(tmp_path / "none.npz"))
