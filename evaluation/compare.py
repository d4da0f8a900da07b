"""Compare checkpoints on size versus quality: each model's footprint and the same seeded benches (the same prompts,
edits and noise for every model), one table, and the Pareto front (no other model is both smaller and better) as a
plot.

Each model's benches live in ``out/<label>/`` beside a ``request.json`` naming what was asked; running the same
comparison again, in any order, reuses them, so adding a model to a comparison benches only the new one.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from dreamlite.io import DreamliteError, atomic_path, identity_track, read_json, staged_dir, write_json, write_text

# --cost name -> (row key, plot scale, plot axis)
COSTS = {"bytes": ("bytes", 1e6, "MB on disk"), "params": ("parameters", 1e6, "million parameters"),
         "macs": ("macs_per_call", 1e9, "GMACs per U-Net call")}
COLUMNS = ("model", "format", "parameters", "MB", "GMACs / call", "steps", "GenEval-style", "ImgEdit-style",
           "images/s", "on the front")  # the table of compare.md and of the terminal


@dataclass(frozen=True)
class BenchPlan:
    """What every model is benched on: GenEval-style ``n_per_tag`` x ``images_per_prompt``, ImgEdit-style
    ``n_per_type`` per edit type (in-context models; 0 skips it), all from ``seed``."""
    n_per_tag: int = 10
    images_per_prompt: int = 1
    n_per_type: int = 10
    seed: int = 0


def pareto_front(points: list[tuple[float, float | None]]) -> list[bool]:
    """Which (cost, score) points no other point dominates (cost no higher and score no lower, one of them strictly).
    A point without a score is never on the front."""
    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])
    scored = [p for p in points if p[1] is not None]
    return [p[1] is not None and not any(dominates(q, p) for q in scored) for p in points]


def labels_for(models: list[str], labels: list[str]) -> list[str]:
    """One label per model: the given ones, else each spec's last path part (a stage folder's name when the spec is
    its model/ or artifact/ folder). Labels must be unique."""
    if labels and len(labels) != len(models):
        raise DreamliteError(f"--label: {len(labels)} labels for {len(models)} models (give one per model, or none)")
    if not labels:
        labels = []
        for spec in models:
            parts = Path(spec).parts or (spec,)
            labels.append("/".join(parts[-2:]) if parts[-1] in ("model", "artifact") and len(parts) > 1 else parts[-1])
    slugs = [_slug(x) for x in labels]
    twice = sorted({x for x, s in zip(labels, slugs) if slugs.count(s) > 1})
    if twice:
        raise DreamliteError(f"--label: {twice[0]!r} names two models (labels name folders: letters, digits, '.', "
                             "'_' and '-' count); give each model its own --label")
    return labels


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "model"


def measure(spec: str, label: str, folder: Path, plan: BenchPlan, overrides: dict, track=identity_track) -> dict:
    """One model's row: footprint, then its benches (reused when ``folder`` holds the same request)."""
    from dreamlite.evaluation.footprint import footprint
    from dreamlite.evaluation.model_bench import bench_edit, bench_gen
    from dreamlite.models.bundle import load_bundle
    from dreamlite.models.sampler import default_settings

    bundle = load_bundle(spec, sampling=True)
    settings = default_settings(bundle).override(seed=plan.seed, **overrides).check()
    request = {"model": spec, "plan": asdict(plan), "sampler": asdict(settings)}
    if (folder / "request.json").is_file():
        if read_json(folder / "request.json") != request:
            raise DreamliteError(f"{folder}: benched earlier with other settings or another model; "
                                 "choose another --out or remove it")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "request.json", request)
    fp = footprint(bundle)
    artifact = bundle.meta.get("artifact")
    row = {"label": label, "model": spec, "class": fp["class"],
           "format": f"onnx {artifact['scheme']}" if artifact else "diffusers",
           "parameters": fp["parameters"], "bytes": fp["bytes_on_disk"] or fp["bytes_fp32"],
           "macs_per_call": fp["macs_per_call"], "in_context": fp["in_context"], "prediction": fp["prediction"],
           "steps": settings.steps, "cfg": settings.cfg, "flow_shift": settings.flow_shift,
           "folder": folder.name}
    gen = _bench(folder / "geneval", lambda work: bench_gen(bundle, work, plan.n_per_tag, plan.images_per_prompt,
                                                            settings, plan.seed, track))
    row |= {"geneval": gen["overall"], "geneval_per_tag": gen["per_tag"], "images_per_s": gen["images_per_s"]}
    row["imgedit"] = row["imgedit_per_type"] = None
    if bundle.in_context and plan.n_per_type:
        edit = _bench(folder / "imgedit", lambda work: bench_edit(bundle, work, plan.n_per_type, settings, plan.seed,
                                                                  track))
        row |= {"imgedit": edit["overall"], "imgedit_per_type": {t: v["overall"] for t, v in edit["per_type"].items()}}
    return row


def _bench(folder: Path, run) -> dict:
    """A finished bench's summary, or run it into ``folder`` (staged: an interrupted bench leaves nothing)."""
    if (folder / "summary.json").is_file():
        return read_json(folder / "summary.json")
    with staged_dir(folder) as work:
        return run(work)


def compare(models: list[str], out, plan: BenchPlan = BenchPlan(), labels: list[str] = (), cost: str = "bytes",
            overrides: dict | None = None, track=identity_track, log=print) -> list[dict]:
    """Bench every model in ``models`` (presets, zoo:NAME, model folders, artifact folders) with ``plan`` and the
    sampler ``overrides`` (over each model's own defaults); write ``compare.json``, ``compare.md`` and
    ``pareto.png`` (score against ``cost``: bytes, params or macs) into ``out``. Returns the rows."""
    if cost not in COSTS:
        raise DreamliteError(f"cost: {cost!r} is not one of {', '.join(COSTS)}")
    if not models:
        raise DreamliteError("compare: give at least one model")
    out = Path(out)
    rows = []
    for k, (spec, label) in enumerate(zip(models, labels_for(list(models), list(labels)))):
        log(f"[{k + 1}/{len(models)}] {label}")
        rows.append(measure(spec, label, out / _slug(label), plan, overrides or {}, track))
    for task in ("geneval", "imgedit"):
        front = pareto_front([(r[COSTS[cost][0]], r[task]) for r in rows])
        for r, on in zip(rows, front):
            r[f"{task}_front"] = on
    write_json(out / "compare.json", {"plan": asdict(plan), "cost": cost, "rows": rows})
    write_text(out / "compare.md", compare_markdown(rows, plan, cost))
    plot_front(rows, cost, out / "pareto.png")
    return rows


def compare_markdown(rows: list[dict], plan: BenchPlan, cost: str) -> str:
    lines = [f"# Size versus quality ({len(rows)} models)", "",
             f"GenEval-style: {plan.n_per_tag} prompts per tag x {plan.images_per_prompt} images; ImgEdit-style: "
             f"{plan.n_per_type} edits per type (in-context models); seed {plan.seed}, the same prompts, edits and "
             f"noise for every model. On the front: no other model is smaller ({COSTS[cost][2]}) and scores higher.",
             "", "| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def cells(r: dict) -> list[str]:
    """A compared row as the table's text cells (``COLUMNS``), for compare.md and the terminal."""
    front = ", ".join(t for t, key in (("gen", "geneval_front"), ("edit", "imgedit_front")) if r[key]) or "–"
    edit = f"{r['imgedit']:.2f}" if r["imgedit"] is not None else "–"
    return [r["label"], r["format"], f"{r['parameters']:,}", f"{r['bytes'] / 1e6:.2f}",
            f"{r['macs_per_call'] / 1e9:.3f}", str(r["steps"]), f"{r['geneval']:.3f}", edit, f"{r['images_per_s']:.2f}",
            front]


def plot_front(rows: list[dict], cost: str, path: Path) -> None:
    """Score against cost, one panel per benchmark that has scores, the Pareto front as a step line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = [t for t in ("geneval", "imgedit") if any(r[t] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key, scale, unit = COSTS[cost]
        pts = [(r[key] / scale, r[task], r["label"], r[f"{task}_front"]) for r in rows if r[task] is not None]
        front = sorted((x, y) for x, y, _, on in pts if on)
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:blue", alpha=0.5)
        for x, y, label, on in pts:
            ax.scatter([x], [y], color="tab:blue" if on else "tab:gray", zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(unit + " (log scale)")
        ax.set_ylabel({"geneval": "GenEval-style overall", "imgedit": "ImgEdit-style overall (1..5)"}[task])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
