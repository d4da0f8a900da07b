"""Recipes: YAML validated by pydantic, run stage by stage into one folder each, with resume.

``dreamlite run RECIPE --out DIR`` makes ``DIR/01-<name>/`` ... Each stage is built in ``NN-<name>.partial/`` and
renamed when its ``metrics.json`` is written, so a finished stage is exactly a folder without the suffix. Re-running
skips finished stages and continues an interrupted one in its .partial folder (stages checkpoint there).
A stage's fingerprint (its config and those of the stages before it) is stored beside it; a finished stage whose
recipe entry has since changed is an error rather than silently stale.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .fsdp import destroy_process_group_at_exit, fsdp_requested
from .io import DreamliteError, identity_track, read_json, write_json, write_text

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class StageConfig(BaseModel):
    """Fields every stage has. Subclasses add ``kind: Literal[...]`` and their own fields; unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    seed: int | None = None

    @field_validator("name")
    @classmethod
    def _plain(cls, v):
        if v is not None and not _NAME.match(v):
            raise ValueError("use lower-case letters, digits, '-' and '_' (it names the stage's folder)")
        return v

    def inputs(self) -> list[str]:
        """Names of earlier stages this stage reads."""
        return []


@dataclass
class StageContext:
    dir: Path  # where the stage writes (its .partial folder while it runs)
    seed: int
    outputs: dict[str, Path]  # earlier stages' finished folders, by stage name
    track: Callable = identity_track
    log: Callable[[str], None] = lambda msg: None
    main: bool = True  # the main process (under `accelerate launch`, only it writes the stage's outputs)

    def input(self, name: str) -> Path:
        return self.outputs[name]


_STAGES: dict[str, tuple[type[StageConfig], Callable[[StageConfig, StageContext], dict]]] = {}
_DISTRIBUTED: set[str] = set()


def stage(config: type[StageConfig], distributed: bool = False):
    """Register ``fn(config, ctx) -> metrics`` as the runner of ``config``'s ``kind``. A ``distributed`` stage runs
    in every process under ``accelerate launch`` (and writes only where ``ctx.main``); others run in the main one."""
    kind = config.model_fields["kind"].annotation.__args__[0]

    def register(fn):
        _STAGES[kind] = (config, fn)
        if distributed:
            _DISTRIBUTED.add(kind)
        return fn
    return register


class _Processes:
    """The processes of an ``accelerate launch`` (one when not launched): who writes, and barriers between stages."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState
            self.state = PartialState(cpu=not torch.cuda.is_available())
            destroy_process_group_at_exit()
        self.main = self.state is None or self.state.is_main_process

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def stage_kinds() -> list[str]:
    _load_builtin_stages()
    return sorted(_STAGES)


def _load_builtin_stages() -> None:
    from . import stages  # noqa: F401, registers world and judge


def recipe_model() -> type[BaseModel]:
    _load_builtin_stages()
    configs = tuple(c for c, _ in _STAGES.values())
    union = Annotated[Union[configs], Field(discriminator="kind")] if len(configs) > 1 else configs[0]
    model = create_model("Recipe", __config__=ConfigDict(extra="forbid"), name=(str, ...), description=(str, ""),
                         seed=(int, 0), stages=(list[union], Field(min_length=1)))
    return model


def _first_error(e: ValidationError, source: str, whole: str) -> str:
    """Pydantic's first error as one line naming the field (``whole`` when it is about the whole object)."""
    err = e.errors()[0]
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{source}: {_where(err['loc']) if err['loc'] else whole}: {err['msg']}{more}"


def _where(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in stage_kinds():
            continue  # pydantic adds the union member's tag to the path; the user never wrote it
        else:
            out += ("." if out else "") + str(part)
    return out or "recipe"


def parse_recipe(data: object, source: str = "recipe"):
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        raise DreamliteError(_first_error(e, source, "recipe")) from None
    names = set()
    for i, st in enumerate(recipe.stages):
        for ref in st.inputs():
            if ref not in names:
                raise DreamliteError(f"{source}: stages[{i}].input: {ref!r} is not the name of an earlier stage")
        name = stage_name(st)
        if name in names:
            raise DreamliteError(f"{source}: stages[{i}].name: duplicate stage name {name!r}")
        names.add(name)
    return recipe


def load_recipe(path):
    return parse_recipe(_read_yaml(Path(path), "recipe"), str(path))


def _read_yaml(path: Path, what: str) -> object:
    """A YAML file's data (``yaml.safe_load``: data only, nothing runs); a missing file or bad YAML is one line."""
    if not path.is_file():
        raise DreamliteError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        raise DreamliteError(f"{path}{at}: invalid YAML ({getattr(e, 'problem', None) or e})") from None


def stage_name(st: StageConfig) -> str:
    return st.name or st.kind


def _fingerprint(config: dict, before: str) -> str:
    """A stage's settings chained over the fingerprints of the stages before it."""
    blob = json.dumps({"before": before, "stage": config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _unchanged(folder: Path, st: StageConfig, previous: str, seed: int) -> dict:
    """The ``stage.json`` of a finished or interrupted stage in ``folder`` (its ``fingerprint`` continues the chain);
    raises if the recipe changed the stage (or one before it, or its seed) since it ran."""
    done = read_json(folder / "stage.json") if (folder / "stage.json").is_file() else {}
    stored = done.get("config")
    current = _fingerprint(st.model_dump(mode="json"), previous)
    same = done.get("fingerprint") == current or (  # or: written before the schema gained a field, still at default
        isinstance(stored, dict) and _fingerprint(stored, previous) == done.get("fingerprint")
        and same_settings(st, stored))
    if not same or done.get("seed", seed) != seed:
        state = "finished" if (folder / "metrics.json").is_file() else "started"
        raise DreamliteError(f"{folder}: {state} with a different recipe (stage {stage_name(st)!r}, one before it, or "
                             f"the seed changed); run with --restart or choose another --out")
    return done


def _json(value):
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else json.loads(json.dumps(value))


def same_settings(current, stored) -> bool:
    """``current`` (a validated config, or one of its values) equals ``stored`` (its JSON dump from an earlier run),
    except for fields the schema gained since, which must still hold their defaults: upgrading dreamlite does not
    invalidate finished stages, changing a setting does."""
    if isinstance(current, BaseModel):
        fields = type(current).model_fields
        return isinstance(stored, dict) and set(stored) <= set(fields) and all(
            same_settings(getattr(current, k), stored[k]) if k in stored
            else _json(getattr(current, k)) == _json(f.get_default(call_default_factory=True))
            for k, f in fields.items())
    if isinstance(current, list) and current and all(isinstance(v, BaseModel) for v in current):
        return isinstance(stored, list) and len(stored) == len(current) and all(map(same_settings, current, stored))
    return _json(current) == stored


def run_recipe(recipe_path, out, restart: bool = False, track=identity_track, log=print) -> dict:
    """Run (or resume) every stage; write report.json and report.md at the run root. Returns the report."""
    recipe = load_recipe(recipe_path)
    out, procs = Path(out), _Processes()
    if procs.main and restart and out.exists():
        _clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    if procs.state is not None and procs.main:
        how = "; training shards its trained modules (FSDP2)" if fsdp_requested() else ""
        log(f"{procs.state.num_processes} processes ({procs.state.distributed_type.value}{how}); this one writes")
    if not procs.main:
        log = _quiet
    outputs: dict[str, Path] = {}
    rows, before = [], ""
    for i, st in enumerate(recipe.stages):
        name = stage_name(st)
        folder = out / f"{i + 1:02d}-{name}"
        seed = st.seed if st.seed is not None else recipe.seed + i
        row = run_stage(st, folder, seed, before, outputs, f"[{i + 1}/{len(recipe.stages)}] {name}", procs, track,
                        log)
        before = row["fingerprint"]
        outputs[name] = folder
        rows.append(row)
    report = {"recipe": recipe.name, "description": recipe.description, "recipe_file": str(recipe_path),
              "seed": recipe.seed, "stages": rows}
    if procs.main:
        write_json(out / "report.json", report)
        write_text(out / "report.md", report_markdown(report))
    return report


def run_stage(st: StageConfig, folder: Path, seed: int, before: str = "", outputs: dict[str, Path] | None = None,
              title: str | None = None, procs: "_Processes | None" = None, track=identity_track, log=print) -> dict:
    """Run (or resume, or skip as done) one stage into ``folder``: built in ``folder.partial`` and renamed when its
    ``metrics.json`` is written. ``before``: the fingerprint of the stages before it (the chain a recipe checks);
    ``outputs``: earlier stages' folders by name. Returns its report row (``stage.json`` with ``metrics``)."""
    procs = procs or _Processes()
    title = title or stage_name(st)
    work = folder.with_name(folder.name + ".partial")
    if (folder / "metrics.json").is_file():
        done = _unchanged(folder, st, before, seed)
        log(f"{title}: done earlier, skipped")
        return done | {"metrics": read_json(folder / "metrics.json")}
    if (work / "stage.json").is_file():  # interrupted: it resumes only with the settings it started with
        _unchanged(work, st, before, seed)
    log(f"{title} ({st.kind}){': resuming' if work.exists() else ''}")
    config = st.model_dump(mode="json")
    info = {"folder": folder.name, "kind": st.kind, "name": stage_name(st),
            "fingerprint": _fingerprint(config, before), "seed": seed, "config": config}
    if procs.main:
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / "stage.json", info)
    procs.barrier()
    _, fn = _STAGES[st.kind]
    start = time.perf_counter()
    metrics = {}
    if procs.main or st.kind in _DISTRIBUTED:
        metrics = fn(st, StageContext(work, seed, dict(outputs or {}), track if procs.main else identity_track, log,
                                      procs.main))
    info["seconds"] = round(time.perf_counter() - start, 2)
    procs.barrier()
    if procs.main:
        write_json(work / "stage.json", info)
        write_json(work / "metrics.json", metrics)
        os.replace(work, folder)
    procs.barrier()
    log(f"      {summary_line(metrics)}  ({info['seconds']} s)")
    return info | {"metrics": metrics}


# ------------------------------------------------------------------------------ one stage outside a recipe
# Fields of a recipe stage that name earlier stages of that recipe; the command line names models instead.
STAGE_REFERENCES = ("input", "teacher_input")


def stage_fields(kind: str, config: str | None = None, stage: str | None = None, sets: tuple[str, ...] = (),
                 given: dict | None = None, replaces: dict[str, str] | None = None) -> StageConfig:
    """One ``kind`` stage's settings for running it alone (``run_alone``), validated by its schema: the fields of
    ``config`` (a YAML mapping of the stage's fields, or a recipe whose stage named ``stage`` is taken, by default
    its only stage of that kind), then each ``KEY=VALUE`` of ``sets`` (a dotted path, list entries by index, the
    value read as YAML), then ``given`` (the command's own options, e.g. the model; None: not given). ``replaces``
    maps a reference to an earlier recipe stage (``input``, ``teacher_input``) to the field of ``given`` that
    names the model instead: a config's reference needs it given."""
    _load_builtin_stages()
    given, replaces = {k: v for k, v in (given or {}).items() if v is not None}, replaces or {}
    fields: dict = {}
    if config is not None:
        fields = _stage_from_file(Path(config), kind, stage)
        for ref in STAGE_REFERENCES:
            if ref in fields and replaces.get(ref) not in given:
                raise DreamliteError(f"{config}: {ref}: the stage reads an earlier stage ({fields[ref]!r}); give "
                                     f"--{replaces.get(ref, 'model')}")
        fields = {k: v for k, v in fields.items() if k not in STAGE_REFERENCES}
    for item in sets:
        _set(fields, item)
    for ref in STAGE_REFERENCES:
        if ref in fields:
            raise DreamliteError(f"--set {ref}: names an earlier stage of a recipe; outside a recipe give "
                                 f"--{replaces.get(ref, 'model')} instead")
    cls, _ = _STAGES[kind]
    try:
        return cls.model_validate({**fields, **given, "kind": kind})
    except ValidationError as e:
        raise DreamliteError(_first_error(e, kind, kind)) from None


def _stage_from_file(path: Path, kind: str, stage: str | None) -> dict:
    data = _read_yaml(path, "config")
    if not isinstance(data, dict):
        raise DreamliteError(f"{path}: expected a mapping of the {kind} stage's fields, or a recipe")
    if "stages" not in data:
        if stage is not None:
            raise DreamliteError(f"{path}: --stage {stage}: the file is one stage's fields, not a recipe")
        if data.get("kind", kind) != kind:
            raise DreamliteError(f"{path}: kind: {data['kind']!r}, this command runs {kind!r}")
        return {k: v for k, v in data.items() if k != "kind"}
    stages = parse_recipe(data, str(path)).stages
    found = [st for st in stages if st.kind == kind and stage in (None, stage_name(st))]
    if len(found) != 1:
        names = [stage_name(st) for st in stages if st.kind == kind]
        if not names:
            raise DreamliteError(f"{path}: the recipe has no {kind} stage")
        which = f"no {kind} stage named {stage!r}" if stage else f"{len(found)} {kind} stages"
        raise DreamliteError(f"{path}: {which} (its {kind} stages: {', '.join(names)}); pick one with --stage")
    return found[0].model_dump(exclude_unset=True, exclude={"kind", "name"})


def _set(fields: dict, item: str) -> None:
    """Apply ``a.b.0.c=VALUE`` to nested ``fields`` (dicts made as needed, lists indexed)."""
    key, eq, raw = item.partition("=")
    if not eq or not key:
        raise DreamliteError(f"--set {item}: expected KEY=VALUE (e.g. phases.0.train.steps=200)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise DreamliteError(f"--set {key}: {raw!r} is not a YAML value") from None
    node, parts = fields, key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise DreamliteError(f"--set {key}: {'.'.join(parts[:i]) or part} has {len(node)} entries; "
                                     f"{part!r} is not one of them")
            part = int(part)
        elif not isinstance(node, dict):
            raise DreamliteError(f"--set {key}: {'.'.join(parts[:i])} is {node!r}, not a mapping or a list")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def run_alone(st: StageConfig, out, seed: int = 0, restart: bool = False, track=identity_track, log=print) -> dict:
    """Run one stage outside a recipe into the folder ``out`` (its model in ``out/model``), with a recipe stage's
    guarantees: built in ``out.partial`` and renamed when done, resumed when interrupted, refused (unless
    ``restart``) when ``out`` holds a stage run with other settings. Returns its report row."""
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    for folder in (out, work):
        if folder.exists() and not (folder / "stage.json").is_file() and any(folder.iterdir()):
            raise DreamliteError(f"{folder}: exists and is not a stage's folder; choose another --out")
        if restart and folder.exists():
            shutil.rmtree(folder)
    return run_stage(st, out, seed, track=track, log=log)


def _clear_run(out: Path) -> None:
    """What ``--restart`` removes: an earlier run's stage folders and reports, nothing else in ``out``."""
    for p in out.iterdir():
        if re.match(r"^\d\d-", p.name) or p.name in ("report.json", "report.md"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _quiet(msg: str) -> None:
    pass


def summary_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items() if isinstance(v, (int, float, str)))


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _flat(d: dict) -> dict:
    """A nested dict's leaves, each under its own key ({"mean": m, "per_sigma": {"1.0": a}} -> {"mean": m, "1.0": a})."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v) if isinstance(v, dict) else {k: v})
    return out


def _table_rows(table: dict) -> dict[str, dict]:
    """One row per entry of a metrics table; an entry whose cells are themselves tables gives one row per cell."""
    rows = {}
    for k, v in table.items():
        if not isinstance(v, dict):
            rows[k] = {"value": v}
        elif any(isinstance(c, dict) for c in v.values()):
            rows.update({f"{k}: {c}": _flat(cell) if isinstance(cell, dict) else {"value": cell}
                         for c, cell in v.items()})
        else:
            rows[k] = v
    return rows


def report_markdown(report: dict) -> str:
    lines = [f"# {report['recipe']}", "", report["description"], "",
             f"Recipe `{report['recipe_file']}`, seed {report['seed']}.", "",
             "| stage | kind | seconds | summary |", "|---|---|---:|---|"]
    for r in report["stages"]:
        lines.append(f"| {r['folder']} | {r['kind']} | {r.get('seconds', '')} | {summary_line(r['metrics'])} |")
    for r in report["stages"]:
        tables = {k: v for k, v in r["metrics"].items() if isinstance(v, dict)}
        for key, table in tables.items():
            rows = _table_rows(table)
            cols = list(dict.fromkeys(c for row in rows.values() for c in row))
            lines += ["", f"## {r['folder']}: {key}", "", "| | " + " | ".join(cols) + " |",
                      "|---|" + "---:|" * len(cols)]
            lines += [f"| {k} | " + " | ".join(_fmt(row[c]) if c in row else "" for c in cols) + " |"
                      for k, row in rows.items()]
    return "\n".join(lines) + "\n"
