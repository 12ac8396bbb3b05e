"""The `disback` command: one sub-command per stage, plus demo, text, sample, export, report and list.

User errors (DisbackError) print one line, `error: ...`, and exit with status 2; no traceback. Warnings go through
the "disback" logger to stderr, as `warning: ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from disback.config import choices
from disback.errors import DisbackError

if TYPE_CHECKING:
    from disback.config import Config

log = logging.getLogger("disback")
DATA_HELP = f"built-in data ({', '.join(choices.DATASETS)}), or {choices.USER_DATA}"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy2d", help="preset name or a .yaml file (default: toy2d)")
    p.add_argument("--config", help="a YAML file merged over the preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one value, e.g. --set distill.steps=500 (repeatable)",
    )
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--method",
        choices=list(choices.METHODS),
        help=f"generator loss (distill.method): {choices.described(choices.METHODS)}",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint "
        "(finished stages are kept; the settings must be the same)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run in --out (written by disback) and start again"
    )


PRETRAINED = "a diffusers UNet2DModel + scheduler (folder or hub id) to distil instead of training a teacher"
FORMATS = (
    "a disback model file or run folder, a diffusers pipeline or UNet folder, or a UNet state dict "
    "(.safetensors, or .bin as DMD2 publishes it)"
)


def _starts(p: argparse.ArgumentParser, fake: bool = True) -> None:
    p.add_argument(
        "--generator", type=Path, help=f"start the generator from a one-step generator distilled before: {FORMATS}"
    )
    if fake:
        p.add_argument("--fake", type=Path, help=f"start the fake score from a critic trained before: {FORMATS}")


TEACHER_FILE = "teacher.safetensors or the folder holding it (written by `disback teacher`)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disback",
        description="Distill a diffusion model into a one-step generator with Distribution Backtracking.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job: teacher, degradation path, DisBack and the baseline, report")
    _common(p)
    p.add_argument("--pretrained", help=PRETRAINED)
    p.add_argument(
        "--teacher",
        help=f"{TEACHER_FILE}, used instead of training one (a diffusers model here is the "
        "deprecated spelling of --pretrained)",
    )
    _starts(p)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")

    p = sub.add_parser("teacher", help="train a teacher denoiser on the data, or import a pretrained diffusers one")
    _common(p)
    p.add_argument("--pretrained", help=PRETRAINED)
    p.add_argument("--out", required=True)

    p = sub.add_parser("degrade", help="stage 1: record the degradation path from a teacher")
    _common(p)
    p.add_argument("--teacher", required=True, help=TEACHER_FILE)
    _starts(p, fake=False)
    p.add_argument("--out", required=True, help="folder for manifest.json and the node files")

    for name, text in (
        ("backtrack", "stage 2: distill along the reversed degradation path"),
        ("distill", "the baseline: plain score distillation from the teacher"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--teacher", required=True, help=TEACHER_FILE)
        if name == "backtrack":
            p.add_argument("--path", required=True, help="a degradation path folder (from `disback degrade`)")
        _starts(p)
        p.add_argument("--out", required=True)

    p = sub.add_parser(
        "text",
        help="text-to-image: distill a Stable Diffusion 1.5 / SDXL / SD3 / FLUX.1 pipeline's network on a prompts "
        "file, both stages, and export a one-step diffusers pipeline",
    )
    _common(p)
    p.set_defaults(preset="")  # the family's: sd, sd3, flux-dev or flux-schnell
    p.add_argument(
        "--pretrained",
        required=True,
        help="a Stable Diffusion 1.5, SDXL, SD3 / SD3.5 or FLUX.1 pipeline folder or hub id",
    )
    p.add_argument(
        "--prompts", required=True, help='a .txt file with one prompt per line, or .jsonl with a "prompt" field'
    )
    p.add_argument("--real", help='real images for dmd2\'s GAN term: a .jsonl file with "image" and "prompt" fields')
    p.add_argument("--no-backtrack", dest="backtrack", action="store_false", help="plain distillation (the baseline)")
    _starts(p)
    p.add_argument("--out", required=True, help="run folder: teacher/, path/, disback/ (or baseline/), pipeline/")

    p = sub.add_parser("sample", help="draw samples from a teacher (Heun) or a generator (one step)")
    p.add_argument("model", help="a .safetensors file written by disback (teacher, node or generator)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=35, help="Heun steps for a denoiser (ignored for a generator)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="an .npy file, in the data's own units")
    p.add_argument("--plot", help="also write a scatter plot (.png)")

    p = sub.add_parser("export", help="write a one-step generator as a diffusers pipeline folder")
    p.add_argument("run", help="a demo folder, a distillation run folder, or a generator.safetensors")
    p.add_argument("--out", required=True, help="the pipeline folder to create")

    p = sub.add_parser(
        "eval",
        help="measure a generator as the field does: FID (Inception or the offline classifier), "
        "CLIP score for text, SWD for points; writes eval.json",
    )
    p.add_argument(
        "target", type=Path, help="a run or demo folder, a generator.safetensors, or an exported pipeline folder"
    )
    p.add_argument(
        "--n", type=int, default=50_000, help="samples (default 50,000 as the papers use; 10,000 for quick checks)"
    )
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ref",
        type=Path,
        help="reference statistics: an .npz of mu/sigma (as EDM's fid.py ref writes it), or a "
        "folder / .npz of images whose statistics are computed once and cached (default: the run's held-out data)",
    )
    p.add_argument(
        "--features",
        default="classifier",
        help="classifier (offline, trained on the run's data: not Inception "
        "FID), inception=FILE or URL (StyleGAN2-ADA's inception-2015-12-05.pt: Inception FID), or module:function",
    )
    p.add_argument("--prompts", type=Path, help="text pipelines: a .txt (one prompt per line) or .jsonl file")
    p.add_argument(
        "--clip", help="text pipelines: a CLIP model for the CLIP score (folder, hub id, or open_clip:ARCH/PRETRAINED)"
    )
    p.add_argument("--out", type=Path, help="where eval.json goes (default: in the target's folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("report", help="rewrite report.md and the plots of a demo folder")
    p.add_argument("run", help="a folder written by `disback demo`")

    sub.add_parser("list", help="list presets, data sets, methods, target schedules and node spacings")
    return parser


def _config(args: argparse.Namespace, data_default: str | None = None):
    from disback.config import build_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.method:
        overrides.setdefault("distill", {})["method"] = args.method
    data = args.data or data_default
    if data:
        overrides.setdefault("data", {})["name"] = data
    if getattr(args, "pretrained", None) and args.command != "text":
        overrides.setdefault("teacher", {})["pretrained"] = args.pretrained
    return build_config(args.preset, args.config, overrides)


def _fitted(cfg: Config, teacher: Path | None = None) -> Config:
    """Image data read at the teacher's size: the teacher file's, or the pretrained model's (--pretrained)."""
    from disback.stages.common import fit_data, teacher_meta

    if teacher is not None:
        return fit_data(cfg, teacher_meta(teacher).shape)
    if cfg.teacher.pretrained:
        from disback.storage.kinds import pretrained_shape

        channels, resolution, _ = pretrained_shape(cfg.teacher.pretrained)
        return fit_data(cfg, (channels, resolution, resolution))
    return cfg


def _demo_teacher(args: argparse.Namespace) -> Path | None:
    """demo --teacher: a disback teacher file (or its folder) to use; a diffusers model is the old spelling of
    --pretrained, with a deprecation note."""
    from disback.stages.common import resolve_teacher

    if not args.teacher:
        return None
    if args.pretrained:
        raise DisbackError(
            "give --pretrained (a diffusers model to import) or --teacher (a disback teacher file), not both"
        )
    given = Path(args.teacher)
    file = resolve_teacher(given)
    if file.is_file():
        if getattr(args, "overwrite", False) and Path(args.out).resolve() in file.resolve().parents:
            raise DisbackError(
                f"--overwrite would delete the teacher {file}, which is inside --out {args.out}; "
                "copy it elsewhere or choose another --out"
            )
        return given
    diffusers_like = given.is_dir() and any((given / n).exists() for n in ("unet", "config.json", "model_index.json"))
    if given.suffix == ".safetensors" or (given.exists() and not diffusers_like):
        raise DisbackError(
            f"no teacher file at {file}: give teacher.safetensors (or its folder) as `disback teacher` "
            "writes it, or a diffusers model with --pretrained"
        )
    log.warning(
        "`demo --teacher` with a diffusers model is deprecated: use --pretrained %s (--teacher takes a "
        "teacher file written by `disback teacher`)",
        args.teacher,
    )
    args.pretrained, args.teacher = args.teacher, None
    return None


def run(argv: list[str] | None = None) -> int:
    """The command, without ending the process group (tests and scripts run several commands in one process)."""
    args = build_parser().parse_args(argv)
    from disback.distributed import is_writer
    from disback.storage.runfolder import clear_out

    # Under several processes (accelerate launch, torchrun) the main one shows progress and prints.
    show = (not args.quiet if hasattr(args, "quiet") else True) and is_writer()
    say = print if is_writer() else (lambda *_: None)
    resume = getattr(args, "resume", False)
    if resume and getattr(args, "overwrite", False):
        raise DisbackError("--resume continues a run and --overwrite deletes it: give one of them")

    def settled(cfg: Config, teacher: Path | None = None) -> None:
        """--overwrite deletes the old run only once the new settings (and the inputs they name) have been checked;
        a job with a stage 1 checks that its distance spacing can place its nodes before anything runs."""
        stage1 = args.command in ("demo", "degrade") or (args.command == "text" and args.backtrack)
        if stage1 and cfg.degrade.spacing == "distance":
            from disback.method.recording import check_probes

            d = cfg.degrade
            check_probes(d.steps, d.probes, d.nodes, d.plateau)
        out = Path(args.out)
        if getattr(args, "overwrite", False) and out.is_dir() and any(out.iterdir()):
            generator, fake = getattr(args, "generator", None), getattr(args, "fake", None)
            # the job checks them again before it writes; here only when there is a run to lose
            if args.command == "text":
                from disback.text import check_text_starts

                check_text_starts(cfg, args.pretrained, generator, fake)
            else:
                from disback.stages import check_starts

                check_starts(cfg, teacher, generator, fake)
            clear_out(out)

    if args.command == "demo":
        from disback.jobs.demo import run_demo
        from disback.jobs.report import write_report
        from disback.stages.common import teacher_meta

        teacher = _demo_teacher(args)
        cfg = _fitted(_config(args, data_default=teacher_meta(teacher).data if teacher else None), teacher)
        settled(cfg, teacher)
        run_demo(cfg, Path(args.out), show, resume, teacher, args.generator, args.fake)
        if is_writer():  # the summary it reads is the main process's
            print(write_report(Path(args.out)))
            print(f"\nreport: {Path(args.out) / 'report.md'}")
    elif args.command == "teacher":
        from disback import stages
        from disback.data import load_data

        cfg = _fitted(_config(args))
        settled(cfg)
        path = stages.train_teacher(cfg, load_data(cfg.data, cfg.seed), Path(args.out), show, resume)
        say(f"teacher: {path}")
    elif args.command == "degrade":
        from disback import stages
        from disback.stages.common import teacher_meta

        cfg = _config(args)
        teacher_meta(Path(args.teacher))  # a missing or wrong teacher fails before --overwrite deletes anything
        settled(cfg, Path(args.teacher))
        path = stages.record_path(cfg, Path(args.teacher), Path(args.out), show, resume, generator=args.generator)
        say(f"degradation path: {path.root / 'manifest.json'} ({len(path)} nodes)")
    elif args.command in ("backtrack", "distill"):
        from disback import stages
        from disback.data import load_data
        from disback.stages.common import resolve_teacher, teacher_meta

        teacher_file = resolve_teacher(Path(args.teacher))
        cfg = _fitted(_config(args, data_default=teacher_meta(teacher_file).data), teacher_file)
        path = stages.load_path_for(teacher_file, Path(args.path)) if args.command == "backtrack" else None
        settled(cfg, teacher_file)
        data = load_data(cfg.data, cfg.seed)
        result = stages.distill(
            cfg, data, teacher_file, path, Path(args.out), show, resume, generator=args.generator, fake=args.fake
        )
        final = "  ".join(f"{k} {v:.4g}" for k, v in result["records"][-1].items() if k in ("swd", "mmd", "fid"))
        say(f"generator: {Path(args.out) / 'generator.safetensors'}  final {final}")
    elif args.command == "text":
        from disback.text import family_of, run_text, sample_command, steps_name

        args.preset = args.preset or family_of(args.pretrained).preset  # an unknown family fails here
        cfg = _config(args)
        settled(cfg)
        out = run_text(
            cfg,
            args.pretrained,
            Path(args.prompts),
            Path(args.out),
            show,
            resume,
            args.backtrack,
            Path(args.real) if args.real else None,
            generator=args.generator,
            fake=args.fake,
        )
        call = json.loads((out / "disback.json").read_text())["call"]
        say(f"{steps_name(cfg.text.timestep)} pipeline: {out}\n  " + sample_command(out, call).replace("; ", "\n  "))
    elif args.command == "sample":
        from disback.jobs.sample import sample_to_file

        sample_to_file(Path(args.model), args.n, args.steps, args.seed, Path(args.out), args.plot)
        say(f"samples: {args.out}")
    elif args.command == "export":
        from disback.jobs.export import export

        out = export(Path(args.run), Path(args.out))
        if (out / "generate.py").is_file():  # an EDM network: the folder's own code samples it
            say(f"one-step generator: {out}  (sample: python {out / 'generate.py'} --n 64 --out samples.png)")
        else:
            custom = f", custom_pipeline='{out}', trust_remote_code=True" if (out / "pipeline.py").is_file() else ""
            say(f"diffusers pipeline: {out}  (load: DiffusionPipeline.from_pretrained('{out}'{custom}))")
    elif args.command == "eval":
        from disback.jobs.evaluate import evaluate, line

        record = evaluate(
            args.target,
            n=args.n,
            batch=args.batch,
            seed=args.seed,
            ref=args.ref,
            features=args.features,
            prompts=args.prompts,
            clip=args.clip,
            out=args.out,
            show_progress=show,
        )
        say(line(record))
    elif args.command == "report":
        from disback.jobs.report import write_report

        say(write_report(Path(args.run)))
    elif args.command == "list":
        say(listing())
    return 0


def listing() -> str:
    """`disback list`: every named choice, with what it means."""
    from disback.config import preset_names

    tables = [
        ("data", choices.DATASETS),
        ("methods (--method)", choices.METHODS),
        ("target schedules (distill.schedule)", choices.SCHEDULES),
        ("node spacings (degrade.spacing)", choices.SPACINGS),
    ]
    lines = [f"presets: {', '.join(preset_names())}"]
    for title, table in tables:
        lines.append(f"{title}:")
        lines += [f"  {name:<13} {getattr(v, 'help', v)}" for name, v in table.items()]
        if table is choices.DATASETS:
            lines.append(f"  (or {choices.USER_DATA})")
    return "\n".join(lines)


class _Stderr(logging.Handler):
    """`warning: ...` on whatever sys.stderr is when the record comes (a test may have replaced it since)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _log_to_stderr() -> None:
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
        log.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    try:
        code = run(argv)
        from disback.distributed import finish

        finish()
        return code
    except DisbackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
