"""The ``dreamlite`` command: parses, calls the library, prints. Bad input is one line on stderr and exit code 1."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .io import DreamliteError, DreamliteWarning, staged_dir, write_json, write_jsonl

console = Console(stderr=True)


def track(iterable, total=None, description=""):
    """Progress bar on stderr (rich); plain when not a terminal."""
    columns = (TextColumn("      {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        yield from progress.track(iterable, total=total, description=description)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DreamliteError as e:
            raise click.ClickException(str(e)) from None


# Loggers that speak while torchao is imported: torchao itself (its CUDA kernels do not load on a CPU build), torch's
# pytree registry (deprecated registrations) and diffusers' torchao quantizer.
TORCHAO_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_torchao_import() -> None:
    """Import diffusers' quantizers with the loggers above at ERROR, then restore them. With the [inc] extra installed,
    torchao (a dependency of neural-compressor) is present, diffusers imports it at start-up, and every command would
    begin with five warnings about kernels that dreamlite never uses."""
    import importlib.util
    import logging

    if importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger(name) for name in TORCHAO_IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import diffusers.quantizers  # noqa: F401  (imports torchao when it is installed)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@click.group(cls=Group)
@click.version_option(package_name="dreamlite")
def main():
    """dreamlite: derive a DreamLite-class mobile diffusion model from a server U-Net, and judge it."""
    quiet_torchao_import()
    show_own_warnings()


def show_own_warnings() -> None:
    """Print the library's own warnings (``DreamliteWarning``) as one line on stderr, without Python's source line."""
    import warnings

    shown = warnings.showwarning
    if getattr(shown, "dreamlite", False):  # main() runs once per command; tests invoke it many times
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DreamliteWarning):
            console.print(f"Warning: {message}", highlight=False, soft_wrap=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show.dreamlite = True
    warnings.showwarning = show


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default runs/<recipe name>).")
@click.option("--restart", is_flag=True, help="Delete this run's stage folders and start over.")
def run(recipe, out, restart):
    """Run RECIPE (YAML) stage by stage; re-running resumes."""
    from .fsdp import end_processes
    from .recipe import load_recipe, run_recipe
    out = Path(out) if out else Path("runs") / load_recipe(recipe).name
    report = run_recipe(recipe, out, restart=restart, track=track, log=lambda m: console.print(m, highlight=False))
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, one process reports
        console.print(f"report: {out / 'report.md'} ({len(report['stages'])} stages)")
    end_processes()


@main.group(cls=Group)
def world():
    """The shapes world: benchmark sets and previews."""


def _perturb_options(fn):
    for name, kind, text in (("shift", float, "move each object by up to this many px"),
                             ("jpeg", int, "JPEG quality (0 = none)"), ("blur", float, "Gaussian blur sigma, px"),
                             ("noise", float, "Gaussian noise sigma, in 1/255")):
        fn = click.option(f"--{name}", type=click.FloatRange(0) if kind is float else click.IntRange(0, 100),
                          default=0, help=f"Perturb rendered images: {text}.")(fn)
    return fn


@world.command("gen-bench")
@click.option("--n-per-tag", type=click.IntRange(1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--render", "render_", is_flag=True, help="Also draw ground-truth samples.")
@click.option("--images-per-prompt", type=click.IntRange(1), default=4, show_default=True)
@click.option("--size", type=click.IntRange(32, 256), default=64, show_default=True)
@_perturb_options
def gen_bench(n_per_tag, seed, out, render_, images_per_prompt, size, noise, blur, jpeg, shift):
    """Write a GenEval-format prompt folder (DIR/00000/metadata.jsonl ...)."""
    from dreamlite.evaluation.geneval import write_gen_bench
    from dreamlite.evaluation.shapes.perturb import Perturbation
    with staged_dir(out) as work:
        n = write_gen_bench(work, n_per_tag, seed, render_, images_per_prompt, size,
                            Perturbation(noise, blur, jpeg, shift), track)
    console.print(f"{n} prompts -> {out}")


@world.command("edit-bench")
@click.option("--n-per-type", type=click.IntRange(1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--render", "render_", is_flag=True, help="Also draw ground-truth targets (DIR/targets/<id>.png).")
@click.option("--size", type=click.IntRange(32, 256), default=64, show_default=True)
@_perturb_options
def edit_bench(n_per_type, seed, out, render_, size, noise, blur, jpeg, shift):
    """Write ImgEdit-style records (DIR/edits.jsonl) and source images."""
    from dreamlite.evaluation.imgedit import write_edit_bench
    from dreamlite.evaluation.shapes.perturb import Perturbation
    if shift:
        raise click.BadParameter("--shift applies to gen-bench only (an edit target's positions are the answer)")
    with staged_dir(out) as work:
        n = write_edit_bench(work, n_per_type, seed, render_, size, Perturbation(noise, blur, jpeg), track)
    console.print(f"{n} edits -> {out}")


@world.command()
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(32, 256), default=64, show_default=True)
def preview(out, seed, size):
    """Draw a labelled grid of scenes with captions and edit (source -> target) pairs."""
    from dreamlite.evaluation.preview import preview as make
    from .io import atomic_path
    with atomic_path(out) as tmp:
        make(seed, size).save(tmp, format="PNG")
    console.print(f"preview -> {out}")


@main.group(cls=Group)
def judge():
    """Score images with the shapes-world judge (GenEval / ImgEdit style)."""


def _table(title: str, rows: dict, columns: list[str]) -> Table:
    table = Table(title=title)
    table.add_column("")
    for c in columns:
        table.add_column(c, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{v:.3f}" for v in values))
    return table


def _write(results, summary, results_path, json_path):
    if results_path:
        write_jsonl(results_path, results)
    if json_path:
        write_json(json_path, summary)


@judge.command("gen")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--results", type=click.Path(dir_okay=False), help="Per-image results (JSONL).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Summary (JSON).")
def judge_gen_cmd(folder, results, json_path):
    """Score FOLDER (GenEval layout) with GenEval's clause logic."""
    from dreamlite.evaluation.geneval import judge_gen
    rows, summary = judge_gen(folder, track)
    _write(rows, summary, results, json_path)
    _print_gen(summary)


def _print_gen(summary: dict) -> None:
    per_tag = {t: [v] for t, v in summary["per_tag"].items()} | {"overall": [summary["overall"]]}
    Console().print(_table(f"GenEval-style ({summary['images']} images)", per_tag, ["score"]))


@judge.command("edit")
@click.option("--edits", type=click.Path(dir_okay=False), required=True, help="edits.jsonl")
@click.option("--images", type=click.Path(file_okay=False), required=True, help="Folder of <id>.png edited images.")
@click.option("--results", type=click.Path(dir_okay=False), help="Per-record results (JSONL).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Summary (JSON).")
def judge_edit_cmd(edits, images, results, json_path):
    """Score edited images on compliance, seamlessness and preservation (1..5)."""
    from dreamlite.evaluation.imgedit import judge_edit
    rows, summary = judge_edit(edits, images, track)
    _write(rows, summary, results, json_path)
    _print_edit(summary)


def _print_edit(summary: dict) -> None:
    from dreamlite.evaluation.shapes.edits import AXES
    cols = ["overall", *AXES]
    table = {t: [v[c] for c in cols] for t, v in summary["per_type"].items()}
    table["overall"] = [summary["overall"]] + [sum(v[c] for v in summary["per_type"].values()) / len(summary["per_type"])
                                               for c in AXES]
    Console().print(_table(f"ImgEdit-style ({summary['images']} edits)", table, cols))


# ------------------------------------------------------------------------------------------------------ models
MODEL_HELP = "A preset (sdxl, sd15, dreamlite-0.39b, shapes-server, shapes-mobile), a model folder, or PRESET:FILE.safetensors."


SCHEDULERS = ("ddim", "euler", "ddpm", "dpm-sde")  # dreamlite.models.sampler.Scheduler (kept light: no diffusers)


def _sampler_options(fn):
    options = [
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                     help="bf16 autocast for the U-Net (default: the model's)."),
        click.option("--batch", type=click.IntRange(1), default=16, show_default=True, help="Images per U-Net batch."),
        click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None,
                     help="Epsilon and v models: ddim, euler, or the stochastic ddpm and dpm-sde (default: the "
                          "model's). Flow models always use flow-matching Euler."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--cfg", type=click.FloatRange(0), default=None, help="Text guidance (default: the model's)."),
        click.option("--steps", type=click.IntRange(1), default=None, help="Sampling steps (default: the model's)."),
        click.option("--flow-shift", type=click.FloatRange(0, min_open=True), default=None,
                     help="Flow models: shift of the sampling sigmas, k s / (1 + (k - 1) s) (default: the model's)."),
    ]
    for option in options:
        fn = option(fn)
    return fn


def _settings(bundle, steps, cfg, seed, scheduler, batch, precision, flow_shift, image_cfg=None):
    from dreamlite.models.sampler import default_settings
    return default_settings(bundle).override(seed=seed, scheduler=scheduler, batch=batch, precision=precision,
                                             steps=steps, cfg=cfg, image_cfg=image_cfg, flow_shift=flow_shift).check()


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model, as_json):
    """Class, parameters, bytes and MACs per call of MODEL (nothing is allocated for presets)."""
    import json
    from dreamlite.evaluation.footprint import footprint
    from dreamlite.models.bundle import load_bundle
    report = footprint(load_bundle(model, meta=True))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table(title=model, show_header=False)
    for k, v in report.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    Console().print(table)


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--prompt", required=True, multiple=True, help="Prompt (repeat for several images).")
@click.option("--size", type=click.IntRange(8), default=None, help="Image size in pixels (default: the model's).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG; several prompts -> OUT-<k>.png.")
@_sampler_options
def sample(model, prompt, size, out, steps, flow_shift, cfg, seed, scheduler, batch, precision):
    """Generate an image from text."""
    from dreamlite.models.bundle import load_bundle
    from dreamlite.models.sampler import generate
    from .io import save_png
    bundle = load_bundle(model, sampling=True)
    settings = _settings(bundle, steps, cfg, seed, scheduler, batch, precision, flow_shift)
    images = generate(bundle, list(prompt), settings, size=size)
    for path, image in zip(_outputs(out, len(images)), images):
        save_png(path, image)
        console.print(f"-> {path}")


def _outputs(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}") for k in range(n)]


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--image", "image_path", required=True, type=click.Path(dir_okay=False), help="Source image.")
@click.option("--prompt", required=True, help="Edit instruction.")
@click.option("--image-cfg", type=click.FloatRange(0), default=None, help="Image guidance (default: the model's).")
@click.option("--resize", is_flag=True, help="Resize the source to the model's size instead of refusing it.")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@_sampler_options
def edit(model, image_path, prompt, image_cfg, resize, out, steps, flow_shift, cfg, seed, scheduler, batch, precision):
    """Edit an image by instruction (in-context models)."""
    from dreamlite.models.bundle import load_bundle
    from dreamlite.models.sampler import edit as run_edit
    from .io import load_image, save_png
    bundle = load_bundle(model, sampling=True)
    image = load_image(image_path, size=bundle.image_size if resize else None)
    settings = _settings(bundle, steps, cfg, seed, scheduler, batch, precision, flow_shift, image_cfg)
    save_png(out, run_edit(bundle, image[None], [prompt], settings)[0])
    console.print(f"-> {out}")


@main.group(cls=Group)
def bench():
    """Sample a fresh seeded benchmark with a model and judge it."""


@bench.command("gen")
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--n-per-tag", type=click.IntRange(1), default=50, show_default=True)
@click.option("--images-per-prompt", type=click.IntRange(1), default=4, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the summary here.")
@_sampler_options
def bench_gen_cmd(model, out, n_per_tag, images_per_prompt, json_path, steps, flow_shift, cfg, seed, scheduler, batch,
                  precision):
    """GenEval-style: sample every prompt into a GenEval folder, judge it."""
    from dreamlite.evaluation.model_bench import bench_gen
    from dreamlite.models.bundle import load_bundle
    bundle = load_bundle(model, sampling=True)
    settings = _settings(bundle, steps, cfg, seed, scheduler, batch, precision, flow_shift)
    with staged_dir(out) as work:
        summary = bench_gen(bundle, work, n_per_tag, images_per_prompt, settings, seed, track)
    _write([], summary, None, json_path)
    _print_gen(summary)


@bench.command("edit")
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--n-per-type", type=click.IntRange(1), default=50, show_default=True)
@click.option("--image-cfg", type=click.FloatRange(0), default=None, help="Image guidance (default: the model's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the summary here.")
@_sampler_options
def bench_edit_cmd(model, out, n_per_type, image_cfg, json_path, steps, flow_shift, cfg, seed, scheduler, batch,
                   precision):
    """ImgEdit-style: edit every source of a fresh edit set, judge it."""
    from dreamlite.evaluation.model_bench import bench_edit
    from dreamlite.models.bundle import load_bundle
    bundle = load_bundle(model, sampling=True)
    settings = _settings(bundle, steps, cfg, seed, scheduler, batch, precision, flow_shift, image_cfg)
    with staged_dir(out) as work:
        summary = bench_edit(bundle, work, n_per_type, settings, seed, track)
    _write([], summary, None, json_path)
    _print_edit(summary)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the benches, compare.md / compare.json and pareto.png; re-running reuses its benches.")
@click.option("--label", "labels", multiple=True, help="A name per model, in order (default: from each path).")
@click.option("--cost", type=click.Choice(["bytes", "params", "macs"]), default="bytes", show_default=True,
              help="The size axis of the Pareto front.")
@click.option("--n-per-tag", type=click.IntRange(1), default=10, show_default=True)
@click.option("--images-per-prompt", type=click.IntRange(1), default=1, show_default=True)
@click.option("--n-per-type", type=click.IntRange(0), default=10, show_default=True,
              help="Edits per ImgEdit type for in-context models (0: generation only).")
@click.option("--image-cfg", type=click.FloatRange(0), default=None, help="Image guidance (default: each model's).")
@_sampler_options
def compare(models, out, labels, cost, n_per_tag, images_per_prompt, n_per_type, image_cfg, steps, flow_shift, cfg,
            seed, scheduler, batch, precision):
    """Compare MODELS (presets, zoo:NAME, model or artifact folders) on size versus quality: footprint and the
    same seeded GenEval- and ImgEdit-style benches for each, a table and the Pareto front. Sampler options left
    out take each model's own defaults."""
    from dreamlite.evaluation.compare import COLUMNS, BenchPlan, cells, compare as run_compare
    plan = BenchPlan(n_per_tag, images_per_prompt, n_per_type, seed)
    overrides = dict(steps=steps, cfg=cfg, image_cfg=image_cfg, flow_shift=flow_shift, scheduler=scheduler,
                     batch=batch, precision=precision)  # None: the model's own (SamplerSettings.override)
    rows = run_compare(list(models), out, plan, labels, cost, overrides, track,
                       log=lambda m: console.print(m, highlight=False))
    table = Table(title=f"size versus quality (seed {seed})")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("model", "format", "on the front") else "right",
                         no_wrap=c == "model")
    for r in rows:
        table.add_row(*cells(r))
    Console().print(table)
    console.print(f"-> {Path(out) / 'compare.md'}, {Path(out) / 'pareto.png'}")


HELD_OUT_ROWS = {"edit_without_source": "no source", "source_gain": "source gain", "copy_source": "copy source"}


@main.command(name="held-out")
@click.argument("models", nargs=-1, required=True)
@click.option("--teacher", default=None, help="Also the teacher (its prediction seen as a flow velocity), and the "
              "noise level from which its velocity is a worse distillation target than the data.")
@click.option("--data", default="shapes", show_default=True, help="'shapes' or a folder with t2i.jsonl / edit.jsonl.")
@click.option("--n", type=click.IntRange(1), default=32, show_default=True, help="Held-out samples per task.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the numbers here.")
def held_out_cmd(models, teacher, data, n, json_path):
    """Flow-matching losses per noise level of MODELS on the same held-out samples and noise: they tell students
    apart where the judges sit at their floor (docs/recovery.md)."""
    from dreamlite.compress.distill.heldout import held_out_report
    from dreamlite.data import data_source
    from dreamlite.evaluation.compare import labels_for
    from dreamlite.models.bundle import load_bundle
    bundles = {label: load_bundle(m) for label, m in zip(labels_for(list(models), []), models)}
    source = data_source(data, next(iter(bundles.values())).image_size)
    report = held_out_report(bundles, source, load_bundle(teacher) if teacher else None, n, source.tasks)
    if json_path:
        write_json(json_path, report)
    tables = dict(report["models"]) | ({f"teacher {teacher}": report["teacher"]} if "teacher" in report else {})
    for title, rows in tables.items():
        sigmas = list(dict.fromkeys(s for r in rows.values() for s in r["per_sigma"]))
        table = Table(title=f"{title}: held-out flow-matching loss ({n} samples per task)", padding=(0, 1))
        for c in ("", "mean", *sigmas):
            table.add_column(c, justify="left" if not c else "right", no_wrap=True)
        for name, r in rows.items():
            table.add_row(HELD_OUT_ROWS.get(name, name), *(f"{v:.3f}" if v is not None else "–" for v in
                                                          (r["mean"], *(r["per_sigma"].get(s) for s in sigmas))))
        Console().print(table)
    for m, sigma in report.get("teacher_worse_from_sigma", {}).items():
        console.print(f"{m}: the teacher's velocity is a worse target than the data "
                      + (f"from sigma {sigma}" if sigma is not None else "nowhere it reaches"))


@main.command()
@click.option("--teacher", required=True,
              help="With --target: an SDXL-layout U-Net (preset, zoo:NAME or model folder). With --width: any "
                   "diffusers model folder.")
@click.option("--target", default=None,
              help="A DreamLite preset (dreamlite-0.39b, shapes-mobile) or a DreamLiteUNetModel config.json: prune to "
                   "exactly that architecture.")
@click.option("--params", default=None, help="A parameter budget (0.39B, 390M): the largest DreamLite layout of "
              "the teacher that fits.")
@click.option("--macs", default=None, help="A budget in MACs per U-Net call at the model's size (1.4T, 500G).")
@click.option("--width", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Generic pruning: fraction of channels to KEEP in every prunable layer group (0.5 = half width).")
@click.option("--importance", type=click.Choice(["magnitude", "taylor", "activation", "random"]), default=None,
              help="Which channels and heads go (taylor / activation need calibration). Default: taylor when "
                   "calibration runs (measured best on the shapes teacher), else magnitude. Recipes can set each "
                   "pass apart (passes:).")
@click.option("--calib", type=click.IntRange(0), default=None,
              help="Calibration batches [--target: 4 for models with a text encoder and codec, else 0 (the teacher "
                   "is then streamed tensor by tensor); --width: 4 random batches].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
def prune(teacher, target, params, macs, width, importance, calib, seed, out):
    """Prune a server U-Net to a DreamLite architecture (--target) or budget (--params / --macs), or any diffusers
    model to a width (--width)."""
    if sum(x is not None for x in (target, params, macs, width)) != 1:
        raise DreamliteError("prune: give exactly one of --target (an architecture), --params or --macs (a budget) "
                             "and --width (a keep ratio)")
    if width is None:
        from dreamlite.compress.prune.target import prune_to_target
        with staged_dir(out) as work:
            report = prune_to_target(teacher, target, work, importance, calib, seed, say=console.print,
                                     params=params, macs=macs)
        dev = report.get("relative_output_deviation")
        console.print(f"{report['teacher_parameters']:,} -> {report['parameters']:,} parameters, "
                      f"{report['teacher_macs_per_call'] / 1e9:.2f} -> {report['macs_per_call'] / 1e9:.2f} GMACs"
                      + (f", output deviation {dev:.3f} on the calibration batches, "
                         f"{report['relative_output_deviation_held_out']:.3f} held out (random init "
                         f"{report['relative_output_deviation_random_init']:.3f})" if dev is not None else "")
                      + f" -> {out}")
        return
    from dreamlite.compress.prune.generic import prune_folder
    with staged_dir(out) as work:
        report = prune_folder(teacher, work, keep=width, importance=importance or "magnitude", calib=calib or 4,
                              seed=seed)
    console.print(f"{report['class']}: {report['parameters_before']:,} -> {report['parameters_after']:,} parameters "
                  f"-> {out}")


def _stage_options(fn):
    """Options every command that runs one training stage shares (the stage's fields, where it writes)."""
    options = [
        click.option("--config", type=click.Path(dir_okay=False), default=None,
                     help="YAML: the stage's fields as in a recipe, or a recipe (its stage of this kind; --stage "
                          "picks one by name). The command's model options replace its references to earlier stages."),
        click.option("--stage", "stage_name", default=None, help="With a recipe as --config: the stage to take."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Set one field after --config: a dotted path, list entries by index, the value read as "
                          "YAML (phases.0.train.steps=200, train.lr=3e-4); repeatable."),
        click.option("--seed", type=int, default=None, help="Seed (default: the stage's seed:, else 0)."),
        click.option("--out", type=click.Path(file_okay=False), required=True,
                     help="The stage's folder: model/, metrics.json and train/ (checkpoints, log, loss curve). "
                          "Built in OUT.partial; re-running resumes it."),
        click.option("--restart", is_flag=True, help="Delete an earlier run of this stage in --out and start over."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run_alone(kind: str, given: dict, replaces: dict[str, str], config, stage_name, sets, seed, out, restart):
    """Validate one ``kind`` stage from the command's options and run it alone (``dreamlite.recipe.run_alone``);
    ``replaces``: which option names the model a recipe's reference to an earlier stage named."""
    from .recipe import run_alone, stage_fields
    st = stage_fields(kind, config, stage_name, sets, given, replaces)
    seed = seed if seed is not None else st.seed if st.seed is not None else 0
    run_alone(st, out, seed, restart, track=track, log=lambda m: console.print(m, highlight=False))
    console.print(f"model: {Path(out) / 'model'}")


@main.command(name="train-teacher")
@click.option("--init", default=None, help="Continue from this model (zoo:NAME or a folder of the same preset).")
@_stage_options
def train_teacher_cmd(init, config, stage_name, sets, seed, out, restart):
    """Train a server teacher text-to-image (stage kind train-teacher; e.g. --config recipes/shapes-teacher.yaml
    --stage teacher)."""
    _run_alone("train-teacher", {"init": init}, {"input": "init"}, config, stage_name, sets, seed, out, restart)


@main.command()
@click.option("--student", default=None, help="The pruned student's model folder (e.g. a prune stage's model/).")
@click.option("--teacher", default=None, help="zoo:NAME or a model folder to distil from (default: none).")
@_stage_options
def recover(student, teacher, config, stage_name, sets, seed, out, restart):
    """Task-progressive recovery training of a pruned student (stage kind recover; e.g. --config
    recipes/shapes-quick.yaml, or --set phases='[{task: t2i, train: {steps: 200, batch: 16}}]')."""
    _run_alone("recover", {"student": student, "teacher": teacher}, {"input": "student", "teacher_input": "teacher"},
               config, stage_name, sets, seed, out, restart)


@main.command(name="reward-tune")
@click.option("--model", default=None, help="The flow model (or epsilon server) to fine-tune.")
@_stage_options
def reward_tune_cmd(model, config, stage_name, sets, seed, out, restart):
    """GRPO reward fine-tuning with the shapes judge as reward (stage kind reward-tune; e.g. --config
    recipes/shapes-rl.yaml)."""
    _run_alone("reward-tune", {"model": model}, {"input": "model"}, config, stage_name, sets, seed, out, restart)


@main.command(name="step-distill")
@click.option("--model", default=None, help="The flow model to distil to few steps.")
@click.option("--teacher", default=None, help="A flow model folder (default: --model itself, before training).")
@_stage_options
def step_distill_cmd(model, teacher, config, stage_name, sets, seed, out, restart):
    """Distil a flow model to K steps, one U-Net call each, guidance distilled in (stage kind step-distill; e.g.
    --set steps=4 --set train.steps=80)."""
    _run_alone("step-distill", {"model": model, "teacher": teacher}, {"input": "model", "teacher_input": "teacher"},
               config, stage_name, sets, seed, out, restart)


BATCH_OPTION = click.option(
    "--batch", type=click.IntRange(1), default=None,
    help="Static batch (default: the guidance branches of --mode at the model's own guidance scales: 1 for a "
         "guidance-distilled model, such as a step-distill stage's or DreamLite's 4-step checkpoint).")


@main.command()
@click.option("--model", required=True, help="A model folder, zoo:NAME or preset with weights.")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--size", type=click.IntRange(8), default=None, help="Image size in pixels (default: the model's).")
@click.option("--mode", type=click.Choice(["generate", "edit"]), default="generate", show_default=True,
              help="Static batch = the guidance branches: 2 for generation, 3 for editing (1 for either when the "
                   "model's guidance is distilled).")
@BATCH_OPTION
def export(model, out, size, mode, batch):
    """ONNX artifact (opset 21, static shapes, in-context width included) with a manifest, checked against torch."""
    from dreamlite.compress.quantize.artifact import export_artifact
    from dreamlite.models.bundle import load_bundle
    bundle = load_bundle(model)
    with staged_dir(out) as work:
        m = export_artifact(bundle, work, size, mode, batch)
    console.print(f"{m['parameters']:,} parameters, {m['bytes'] / 2 ** 20:.1f} MiB, inputs "
                  + ", ".join(f"{i['name']}{i['shape']}" for i in m["inputs"])
                  + f"; ORT vs torch max |diff| {m['check']['ort_vs_torch_max_abs']:.1e} -> {out}")


@main.command()
@click.option("--model", required=True, help="A model folder (exported first) or an fp32 artifact.")
@click.option("--scheme", type=click.Choice(["w8a16", "w8a8"]), default="w8a16", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--calib", type=int, default=8, show_default=True,
              help="Generations (and edits, for in-context models) the sampler runs for calibration.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Sampling steps (default: the model's).")
@click.option("--keep-float", multiple=True, help="Keep nodes of this module (e.g. conv_out) in float; repeatable.")
@click.option("--size", type=click.IntRange(8), default=None)
@click.option("--mode", type=click.Choice(["generate", "edit"]), default="generate", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@BATCH_OPTION
@click.option("--calib-data", type=click.Choice(["sampler", "random"]), default="sampler", show_default=True,
              help="sampler: the denoiser calls of --calib generations (and edits); random: --calib Gaussian feeds "
                   "(models that cannot sample, e.g. a preset with random weights).")
@click.option("--backend", type=click.Choice(["ort", "inc"]), default="ort", show_default=True,
              help="ort: ONNX Runtime's QNN QDQ configuration; inc: Intel Neural Compressor's static INT8 in torch "
                   "(W8A8), exported to QDQ ONNX (needs the [inc] extra).")
@click.option("--sensitivity", is_flag=True,
              help="Measure how much error each U-Net module carries (each probed alone at higher precision) into "
                   "the manifest.")
@click.option("--fallback", type=click.IntRange(0), default=0, show_default=True,
              help="Keep the N most sensitive modules at higher precision: 16-bit activations under W8A8, float "
                   "under W8A16 (implies --sensitivity).")
def quantize(model, scheme, out, calib, steps, keep_float, size, mode, seed, batch, calib_data, backend, sensitivity,
             fallback):
    """QDQ ONNX for Qualcomm QNN (W8A16 or W8A8), calibrated on the sampler's own denoiser calls."""
    from dreamlite.compress.quantize.qdq import quantize_artifact
    with staged_dir(out) as work:
        m = quantize_artifact(model, work, scheme, calib, steps, tuple(keep_float), seed, size, mode, batch,
                              calib_data, backend, sensitivity, fallback, say=console.print)
    if "sensitivity" in m:
        s = m["sensitivity"]
        console.print(f"sensitivity (error {s['baseline']:.4f} with every module quantized; each row: that module at "
                      f"{s['higher_precision']}):")
        for r in s["modules"][:8]:
            console.print(f"  {r['module']:<28} {r['nodes']:>5} nodes  error {r['error']:.4f}  gain {r['gain']:+.4f}")
    console.print(f"{scheme}: {m['bytes'] / 2 ** 20:.1f} MiB, relative error vs fp32 "
                  f"{m['check']['relative_error_vs_fp32']:.4f} on {m['check']['held_out_calls']} recorded calls -> {out}")


@main.command(name="qnn-check")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--no-compare", is_flag=True, help="Skip the output comparison with the CPU provider.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--timeout", type=click.IntRange(1), default=1800, show_default=True,
              help="Seconds each QNN step (session build, comparison) may take; the HTP simulator compiles large "
                   "graphs slowly (DreamLite-0.39B at 1024 px: 1 h 37 min on 2 cores).")
def qnn_check_cmd(artifact, no_compare, json_path, timeout):
    """Build the artifact on the QNN HTP backend with CPU fallback disabled; exit 1 unless every node runs on QNN."""
    from dreamlite.compress.quantize.qnn import qnn_check
    r = qnn_check(artifact, compare=not no_compare, timeout=timeout)
    if json_path:
        write_json(json_path, r)
    console.print(f"{r['scheme']}: {r['on_qnn']}/{r['nodes']} nodes on QNN HTP ({100 * r['coverage']:.1f}%)"
                  + (f", relative difference vs CPU {r['relative_diff_vs_cpu']}" if "relative_diff_vs_cpu" in r else "")
                  + (f"; {r['compare_error']}" if "compare_error" in r else ""))
    if not r["passed"]:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["not_on_qnn"].items())) or r["error"]
        raise DreamliteError(f"{artifact}: not every node runs on QNN HTP ({ops})")


if __name__ == "__main__":
    sys.exit(main())
