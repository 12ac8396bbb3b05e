"""Stage 2, Distribution Backtracking: the generator distilled while the target walks the reversed degradation path
back to the teacher; with no path, the baseline (plain score distillation: the teacher is the only node)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from accelerate.utils import set_seed

from disback.config import Config
from disback.config.choices import METHODS
from disback.data import Data
from disback.diffusion.generator import with_steps
from disback.distributed import strided, wait
from disback.engine.log import read_metrics
from disback.engine.loop import Callback, train_loop
from disback.errors import DisbackError
from disback.method.distillation import Distillation
from disback.method.lora import fake_and_target, merged, scratch, trainable_generator
from disback.method.path import DegradationPath
from disback.method.schedules import make_schedule
from disback.stages.common import (
    DataSource,
    check_data_matches,
    eval_noise,
    in_batches,
    load_teacher,
    loop_options,
    metrics_for,
    metrics_log,
    resolve_teacher,
)
from disback.stages.runtime import accelerator, sharded, speed_up
from disback.stages.starts import StartPoint, check_start, keep_start, start_from
from disback.storage.external import load_start
from disback.storage.files import save_array, sha256_file, write_json
from disback.storage.kinds import kind_of
from disback.storage.models import generator_from_teacher, save_model
from disback.storage.runfolder import begin_stage

log = logging.getLogger(__name__)
RESULT = "result.json"  # written last by a distillation run: the run is finished
LORA_GENERATOR = "generator-lora.safetensors"  # network.generator_lora_rank: the generator's adapters alone


def distill(
    cfg: Config,
    data: Data,
    teacher_file: Path,
    path: DegradationPath | None,
    out: Path,
    show_progress: bool = True,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    generator: Path | None = None,
    fake: Path | None = None,
    measure: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Distribution Backtracking over ``path``; with ``path=None``, the baseline (the teacher is the only node).

    The generator starts as the teacher's copy, or from ``generator`` (a one-step generator distilled before; over a
    path recorded toward one, that one, which is the default). The fake score starts at the path's last node (the
    teacher for the baseline), or from ``fake``. disback.storage.external lists the formats of both. With
    ``resume``, continue from the folder's latest checkpoint (a finished run is read back as it is). ``callbacks`` join
    the loop's. ``measure`` replaces the data's own measure (disback.metrics) at each evaluation: samples in the data's
    units -> values (the text plugin's CLIP score). Returns the result (switches, nodes) and the metrics records."""
    out = Path(out)
    teacher_file = resolve_teacher(teacher_file)
    acc = accelerator(cfg.run.precision)
    fsdp = sharded(cfg, acc)  # a launch that cannot shard fails before anything is written
    stage = "distill" if path is None else "backtrack"
    teacher_sha = sha256_file(teacher_file)
    if path is None:
        path = DegradationPath.teacher_only(teacher_file, teacher_sha)
    check_lora_matches(cfg, path)
    generator = generator if generator is not None else path.initial_generator
    # Every check of what the run starts from comes before anything is written.
    teacher, meta = load_teacher(teacher_file)
    check_data_matches(data, meta, teacher_file)
    rank = cfg.network.generator_lora_rank
    if rank and generator is not None:
        raise DisbackError(
            f"network.generator_lora_rank={rank} trains adapters on the teacher's weights, so the generator starts as "
            f"the teacher; to start from {generator}, set network.generator_lora_rank=0"
        )
    # the generator: a copy of the teacher, or (LoRA) adapters on the teacher's own weights, which stay frozen
    if rank:
        net = trainable_generator(kind_of(meta).generator(teacher, meta, cfg.distill.sigma_g), rank, cfg.seed + 5)
    else:
        net = generator_from_teacher(teacher, meta, cfg.distill.sigma_g)
    start = start_from(net, generator, "generator", meta, cfg)
    check_path_start(path, start)
    fake_start = check_start(fake, "denoiser", teacher, meta, cfg)
    inputs = {"teacher_sha256": teacher_sha, "nodes_sha256": [n.sha256 for n in path.nodes]}
    inputs.update({"generator_sha256": start.meta.origin["sha256"]} if start else {})
    inputs.update({"fake_sha256": fake_start.origin["sha256"]} if fake_start else {})
    begin_stage(cfg, out, resume, inputs)
    if resume and (out / RESULT).is_file():
        return {**json.loads((out / RESULT).read_text()), "records": read_metrics(out / "metrics.jsonl")}
    keep_start(net, start, out)
    measure = measure or metrics_for(cfg, data)  # before the seed: a feature network trained now must not shift the RNG
    set_seed(cfg.seed + 2)  # the same seed for DisBack and the baseline
    generator = net
    # every node's sha256, keys and shapes, before any training (the baseline's one node is the teacher's full file)
    path.verify(scratch(teacher, cfg.network.lora_rank if len(path) > 1 else 0))
    # With LoRA the target's base is the teacher shared with the fake score: under bf16 it is cast once, on purpose
    # (a frozen base in bf16, the adapters trained in fp32), in Distillation.
    fake, target = fake_and_target(teacher, cfg.network.lora_rank, len(path))
    if fake_start is not None:
        rank = cfg.network.lora_rank
        keep_start(
            fake,
            StartPoint(
                load_start(fake, fake_start, meta, sigma_g=cfg.distill.sigma_g, lora_rank=rank),
                fake_start.file if fake_start.fmt == "disback" else None,
            ),
            out,
        )
    target = kind_of(meta).target(target, cfg)  # e.g. classifier-free guidance on a text target (the target only)
    speed_up(cfg.run, generator, fake, target)
    d = cfg.distill
    low, high = dwell_bounds(cfg, len(path))
    schedule = make_schedule(
        len(path), d.schedule, every=d.switch_every, ratio=d.switch_ratio, min_dwell=low, max_dwell=high
    )
    warn_short_walk(cfg, len(path))
    needs_data = METHODS[d.method].gan or (generator.steps > 1 and d.step_input == "data")
    real = DataSource(data, meta.num_classes, acc.device, cfg.seed + 3) if needs_data else None
    task = Distillation(
        generator,
        fake,
        target,
        path,
        schedule,
        cfg=d,
        edm=cfg.edm,
        shape=data.shape,
        accelerator=acc,
        stage=stage,
        num_classes=meta.num_classes,
        real=real,
        fsdp=fsdp,
        fake_from_path=fake_start is None,
    )
    z, labels = eval_noise(cfg, data.shape, meta.num_classes, acc.device, steps=generator.steps)

    def samples() -> np.ndarray:  # shared among processes, if several; every class alike in each
        return data.from_model(strided(lambda zz, yy: in_batches(with_steps(generator), zz, yy), z, labels))

    records = train_loop(
        task,
        d.steps,
        evaluate=lambda: measure(samples()),
        eval_every=cfg.eval.every,
        callbacks=callbacks,
        log=metrics_log(cfg, out, stage),
        show_progress=show_progress,
        **loop_options(cfg, out, resume),
    )
    save_array(out / "samples.npy", samples())
    # the whole generator (LoRA: its adapters merged into a copy of the teacher's weights), and LoRA's adapters alone
    save_model(merged(generator), out / "generator.safetensors", meta.as_generator(d.sigma_g))
    if rank:
        save_model(generator, out / LORA_GENERATOR, meta.as_generator(d.sigma_g).as_adapters(rank))
    save_model(fake, out / "fake.safetensors", meta.as_adapters(cfg.network.lora_rank))
    # switch_seconds: the loop's wait at each switch in this process (a resumed run times only its own)
    result = {"switches": task.switches, "nodes": len(path), "switch_seconds": task.switch_seconds}
    write_json(out / RESULT, result)  # last: its presence marks the run as finished
    wait()
    return {**result, "records": records}


def check_path_start(path: DegradationPath, start: StartPoint | None) -> None:
    """Backtracking starts from the generator the path was recorded toward: the teacher's copy, or a distilled one."""
    if len(path) == 1:
        return
    given = start.meta.origin["sha256"] if start else None
    if given != path.initial_generator_sha256:
        recorded = "the teacher's copy" if path.initial_generator is None else f"the generator {path.initial_generator}"
        now = "the teacher's copy" if start is None else f"the generator from {start.meta.origin['source']}"
        raise DisbackError(
            f"the path {path.root} was recorded toward {recorded}, and this run starts from {now}; give "
            "that generator (or none), or record the path from this one (disback degrade --generator ...)"
        )


def check_lora_matches(cfg: Config, path: DegradationPath) -> None:
    """A path of LoRA nodes needs a LoRA fake score and target of the same rank, and a path of full nodes full ones."""
    recorded = path.config.get("network", {}).get("lora_rank", 0) if len(path) > 1 else cfg.network.lora_rank
    if recorded != cfg.network.lora_rank:
        raise DisbackError(
            f"the path {path.root} was recorded with network.lora_rank={recorded}, and this run has "
            f"{cfg.network.lora_rank}; use --set network.lora_rank={recorded}, or record the path again"
        )


def dwell_bounds(cfg: Config, num_nodes: int) -> tuple[int, int]:
    """The adaptive schedule's (min, max) steps per node, shrunk so that the walk reaches the teacher by half of
    distill.steps at the latest: the generator always trains against the teacher."""
    high = max(min(cfg.distill.max_dwell, cfg.distill.steps // (2 * max(num_nodes - 1, 1))), 1)
    return min(cfg.distill.min_dwell, high), high


def warn_short_walk(cfg: Config, num_nodes: int) -> None:
    """The fixed schedule is taken as given (it is the paper's recipe), but a walk that reaches the teacher only after
    the budget ends leaves a generator that never trained against the teacher: say so, and how to fix it."""
    d = cfg.distill
    arrival = (num_nodes - 1) * d.switch_every
    if d.schedule == "fixed" and num_nodes > 1 and arrival >= d.steps:
        log.warning(
            f"with distill.schedule 'fixed', the target walks {num_nodes - 1} nodes every {d.switch_every} steps and "
            f"reaches the teacher at step {arrival}, not before distill.steps ({d.steps}) ends; lower "
            f"distill.switch_every to at most {max(d.steps // (2 * (num_nodes - 1)), 1)} (the teacher by half of "
            "the budget) or raise distill.steps"
        )
