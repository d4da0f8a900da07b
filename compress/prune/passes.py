"""The target passes: server U-Net (SDXL layout) -> DreamLite layout, one small function per pass.

A pass takes a ``PrunedUNet`` (the teacher's tensors, streamed, and what is kept of them so far), its settings and the
``Evidence`` its criterion measures with, and returns a new ``PrunedUNet`` with its report entry appended;
``materialize`` returns the target's diffusers model. Chained::

    model = PrunedUNet(StateDictSource(teacher.state_dict()), dict(teacher.config), target_config)
    model = depth(model, DepthPass(importance="norm"))
    model = width(model, WidthPass(importance="magnitude"))
    model = heads(model, HeadsPass(importance="magnitude"))
    student = materialize(model, MaterializePass())

or ``run_passes(model, [DepthPass(), ...])``, which is what a recipe's ``passes:`` list runs (a pass left out runs
with its defaults, in the order of ``PASS_ORDER``).

- ``depth``: which transformer layers of each attention block survive (SDXL 10 -> 4, mid 10 -> 4): measured (the
  U-Net's output change when a layer is skipped, on calibration batches) or the weight norm of what it writes.
- ``width``: which channels of every coupled space survive (``unet.dims_of``), the same number in every GroupNorm
  group, so the student's groups see the teacher's statistics.
- ``heads``: which attention heads survive (SDXL [5, 10, 20] -> DreamLite [4, 8, 14]).
- ``materialize``: the target's tensors from the kept slices, fitted or new where the teacher has no counterpart
  (``materialize.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Annotated, Callable, Literal, Union

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from dreamlite.io import DreamliteError

from .compensate import Calibration
from .importance import CRITERIA
from .materialize import write_student
from .unet import (LAYER_NAME, Plan, Space, TensorSource, activation_scores, block_layers, block_norm_scores,
                   block_skip_scores, channel_scores, dims_of, layer_norm_scores, removable_layers, select,
                   skip_scores, student_name_to_teacher, target_sizes, taylor_saliency, teacher_spaces,
                   transformer_depths, unet_call)

TARGET_CLASS = "DreamLiteUNetModel"
PASS_ORDER = ("depth", "width", "heads", "materialize")
DATA_CRITERIA = ("measured", "taylor", "activation")  # these need calibration batches


# ------------------------------------------------------------------------------------------------------- settings
class _Pass(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DepthPass(_Pass):
    kind: Literal["depth"] = Field("depth", alias="pass")
    importance: Literal["measured", "norm"] | None = Field(
        None, description="measured: output change when a block or transformer layer is skipped (default with "
                 "calibration); norm: the weight norm of what it writes")


class WidthPass(_Pass):
    kind: Literal["width"] = Field("width", alias="pass")
    importance: Literal[CRITERIA] | None = Field(None, description="default: taylor with calibration, else magnitude")
    seed: int | None = Field(None, description="the random criterion's draw (default: the run's seed)")


class HeadsPass(_Pass):
    kind: Literal["heads"] = Field("heads", alias="pass")
    importance: Literal[CRITERIA] | None = Field(None, description="default: the width pass's")
    seed: int | None = Field(None, description="the random criterion's draw (default: the width pass's)")


class MaterializePass(_Pass):
    kind: Literal["materialize"] = Field("materialize", alias="pass")
    fold: bool = Field(True, description="fold pruned input channels into the kept ones (with calibration)")
    renormalize: bool = Field(True, description="correct GroupNorms for the channels they lost (with calibration)")


PassSettings = Annotated[Union[DepthPass, WidthPass, HeadsPass, MaterializePass], Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------- the model and the data
def build_target(cfg: dict, seed: int, device: str = "cpu") -> nn.Module:
    """A ``DreamLiteUNetModel`` from a target config (keys starting with ``_`` ignored), seeded."""
    from dreamlite.models.presets import build

    try:
        return build({k: v for k, v in cfg.items() if not k.startswith("_")}, TARGET_CLASS, device, seed).eval()
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise DreamliteError(f"--target: the config does not build a {TARGET_CLASS} "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class PrunedUNet:
    """A student in the making: the teacher's tensors (read one at a time) and config, the target config it is cut
    to, and the plan of what is kept so far with the report of every pass that made it. Nothing of the student
    is allocated until ``materialize``."""
    source: TensorSource
    teacher_config: dict
    target_config: dict
    plan: Plan = field(default_factory=Plan)

    @cached_property
    def shape_model(self) -> nn.Module:
        """The target on the meta device: its tensor names, shapes and full config."""
        return build_target(self.target_config, 0, "meta")

    def spaces(self) -> dict[str, Space]:
        return teacher_spaces(self.source, self.teacher_config)

    def evolve(self, entries: list[dict], layers: dict | None = None, keep: dict | None = None,
               blocks: dict | None = None) -> "PrunedUNet":
        """A new model with ``layers`` / ``keep`` / ``blocks`` added to the plan and ``entries`` to the report."""
        p = self.plan
        return replace(self, plan=Plan({**p.layers, **(layers or {})}, {**p.keep, **(keep or {})},
                                       [*p.report, *entries], {**p.blocks, **(blocks or {})}))


@dataclass
class Evidence:
    """What the data-driven criteria measure with, and what materialize folds in; all optional (weight-only
    criteria need none). ``teacher``: the dense teacher; ``batches``: calibration batches (``target.
    calibration_batches``); ``statistics``: the teacher's input statistics (``calibration_statistics``);
    ``pooled_mean``: the mean pooled text vector; ``module_macs``: the teacher's MACs per module, for MACs after
    each pass; ``seed``: the random criterion's default draw. Channel scores are cached per criterion: one
    ``Evidence`` per teacher."""
    teacher: nn.Module | None = None
    batches: list[dict] | None = None
    statistics: Calibration | None = None
    pooled_mean: torch.Tensor | None = None
    module_macs: dict[str, int] | None = None
    seed: int = 0
    say: Callable[[str], None] = lambda _m: None
    _scores: dict = field(default_factory=dict, repr=False)

    @property
    def calibrated(self) -> bool:
        return self.teacher is not None and bool(self.batches)

    def calls(self) -> list[dict]:
        return [unet_call(self.teacher, b, False) for b in self.batches]

    def channel_scores(self, model: PrunedUNet, criterion: str, seed: int | None) -> dict[str, torch.Tensor]:
        """Scores of every space by ``criterion``, computed once per criterion and draw."""
        key = (criterion, self.seed if seed is None else seed)
        if key not in self._scores:
            spaces, cfg = model.spaces(), model.teacher_config
            if criterion == "activation":
                self._scores[key] = activation_scores(self.teacher, self.batches, cfg, spaces)
            else:
                if criterion == "taylor" and ("saliency", 0) not in self._scores:
                    self._scores["saliency", 0] = taylor_saliency(self.teacher, self.batches)
                self._scores[key] = channel_scores(model.source, cfg, spaces, criterion,
                                                   self._scores.get(("saliency", 0)), key[1])
        return self._scores[key]


def default_importance(kind: str, calibrated: bool) -> str:
    """A pass's criterion when none is given: measured depth and taylor width / heads with calibration (measured
    best on the shipped teacher), else write norm and magnitude."""
    if kind == "depth":
        return "measured" if calibrated else "norm"
    return "taylor" if calibrated else "magnitude"


def _need_data(label: str, criterion: str, calibrated: bool) -> None:
    if criterion in DATA_CRITERIA and not calibrated:
        raise DreamliteError(f"{label}: importance {criterion!r} needs calibration batches (--calib N), which need a "
                             "model with a text encoder and codec beside it (a shapes-world model folder)")


# --------------------------------------------------------------------------------------------------------- passes
PASSES: dict[type, Callable] = {}  # settings class -> pass (the registry run_passes dispatches through)


def prune_pass(settings: type):
    def register(fn):
        PASSES[settings] = fn
        return fn
    return register


def _block_candidates(t_blocks: dict[str, int], s_blocks: dict[str, int], stages: int) -> dict[str, list[int]]:
    """Per down / up block that loses layers, the layers that may go; a target that asks for more layers than the
    teacher has, or for removing one that cannot go, is refused."""
    candidates = {}
    for block, n in sorted(s_blocks.items()):
        have = t_blocks.get(block, n)
        allowed = removable_layers(block, have, stages)
        if n > have:
            raise DreamliteError(f"{block}: the target has {n} layers, the teacher only {have}")
        if have - n > len(allowed):
            raise DreamliteError(f"{block}: the target has {n} layers, the teacher {have}; at most "
                                 f"{len(allowed)} can go (layers {allowed}: the others widen the stream or read "
                                 "the block below or the skip across stages)")
        if n < have:
            candidates[block] = allowed
    return candidates


def _choice(source, unit: str, where: str, n: int, have: int, scores: list, prefixes: list[str], label: str) -> dict:
    """Keep the ``n`` best-scored of ``have`` layers (a score of None: the layer cannot go); the report entry."""
    ranked = [j for j in np.argsort([-np.inf if x is None else x for x in scores])[::-1] if scores[j] is not None]
    forced = [j for j in range(have) if scores[j] is None]
    kept = sorted(int(j) for j in forced + ranked[:n - len(forced)])
    gone = tuple(p.format(j) for p in prefixes for j in range(have) if j not in kept)
    return {"pass": "depth", "unit": unit, "block": where, "teacher_layers": have, "kept": kept,
            "parameters_removed": sum(int(np.prod(source.shape(k))) for k in source.keys() if k.startswith(gone)),
            "scores": [None if x is None else round(float(x), 6) for x in scores], "criterion": label}


@prune_pass(DepthPass)
def depth(model: PrunedUNet, settings: DepthPass | None = None, evidence: Evidence | None = None) -> PrunedUNet:
    """Keep the most important layers (a ResNet and its attention block) of every down and up block, then the most
    important transformer layers of every attention block the target keeps."""
    settings, evidence = settings or DepthPass(), evidence or Evidence()
    criterion = settings.importance or default_importance("depth", evidence.calibrated)
    _need_data("passes.depth", criterion, evidence.calibrated)
    source, student_keys = model.source, list(model.shape_model.state_dict())
    label = "skip-output-change" if criterion == "measured" else "write-norm"

    def choose(unit: str, where: str, n: int, have: int, scores: list, prefixes: list[str]) -> list[int]:
        entries.append(_choice(source, unit, where, n, have, scores, prefixes, label))
        return entries[-1]["kept"]

    entries: list[dict] = []
    t_blocks, s_blocks = block_layers(source.keys()), block_layers(student_keys)
    candidates = _block_candidates(t_blocks, s_blocks, len(model.teacher_config["block_out_channels"]))
    measured_blocks = None
    if criterion == "measured" and candidates:
        evidence.say("depth: measuring each block layer's effect on the output")
        measured_blocks = block_skip_scores(evidence.teacher, evidence.calls(), candidates)
    blocks = {}
    for block, allowed in candidates.items():
        have = t_blocks[block]
        scores = measured_blocks[block] if measured_blocks else [
            x if j in allowed else None for j, x in enumerate(block_norm_scores(source, block, have))]
        blocks[block] = choose("block layer", block, s_blocks[block], have, scores,
                               [block + ".resnets.{}.", block + ".attentions.{}."])

    t_depth = transformer_depths(source.keys())
    s_depth = transformer_depths(student_name_to_teacher(k, Plan(blocks=blocks)) for k in student_keys)
    measured = None
    if criterion == "measured":
        evidence.say("depth: measuring each transformer layer's effect on the output")
        measured = skip_scores(evidence.teacher, evidence.calls())
    layers = {}
    for attn, n in sorted(s_depth.items()):
        if attn not in t_depth:
            continue
        if n > t_depth[attn]:
            raise DreamliteError(f"{attn}: the target has {n} transformer layers, the teacher only {t_depth[attn]}")
        scores = measured[attn] if measured else layer_norm_scores(source, attn, t_depth[attn])
        if n < t_depth[attn]:
            layers[attn] = choose("transformer layer", attn, n, t_depth[attn], scores,
                                  [attn + ".transformer_blocks.{}."])
        else:
            layers[attn] = list(range(n))
    for i, entry in enumerate(entries):  # the footprint after each block's layers went
        done = {e["block"]: e["kept"] for e in entries[:i + 1]}
        entry.update(footprint(model.evolve([], layers={a: k for a, k in done.items() if a in layers},
                                            blocks={b: k for b, k in done.items() if b in blocks}),
                               evidence.module_macs))
    return model.evolve(entries, layers=layers, blocks=blocks)


def _channel_pass(model: PrunedUNet, settings, evidence: Evidence, heads: bool) -> PrunedUNet:
    """Keep the best channels of every width space (``heads=False``) or the best whole heads of every attention
    space (``heads=True``), as many as the target has."""
    label = "passes.heads" if heads else "passes.width"
    criterion = settings.importance or default_importance("width", evidence.calibrated)
    _need_data(label, criterion, evidence.calibrated)
    spaces = {s: sp for s, sp in model.spaces().items() if (sp.unit > 1) == heads}
    evidence.say(f"{'heads' if heads else 'width'}: scoring channels ({criterion})")
    scores = evidence.channel_scores(model, criterion, settings.seed)
    sd = model.shape_model.state_dict()
    targets = target_sizes(sd, model.source, model.teacher_config, dict(model.shape_model.config), model.plan)
    keep = {}
    for s, n in sorted(targets.items()):
        if s in spaces:
            try:
                keep[s] = select(scores[s], n, spaces[s])
            except DreamliteError as e:
                raise DreamliteError(f"{s}: {e}") from None
    if not heads:  # two spaces joined by an identity shortcut in both models must keep the same channels
        for name in sd:
            m = re.match(r"^(.*resnets\.\d+)\.norm1\.weight$", name)
            if m and f"{m.group(1)}.conv_shortcut.weight" not in sd:
                t = student_name_to_teacher(m.group(1), model.plan)
                cfg = model.teacher_config
                (a,), (b,) = dims_of(f"{t}.norm1.weight", (1,), cfg)[0], dims_of(f"{t}.conv2.bias", (1,), cfg)[0]
                if a != b and a in keep and b in keep:
                    keep[b] = keep[a]
    shrunk = {s: [spaces[s].size, len(k)] for s, k in keep.items() if len(k) < spaces[s].size}
    if heads:
        entry = {"pass": "heads", "criterion": criterion, "attention_layers_pruned": len(shrunk),
                 "example": {s: [t // spaces[s].unit, n // spaces[s].unit] for s, (t, n) in list(shrunk.items())[:3]}}
    else:
        entry = {"pass": "width", "criterion": criterion, "spaces_pruned": len(shrunk),
                 "channels": {s: v for s, v in shrunk.items() if re.match(r"^(down|up)\d+$", s)}}
    out = model.evolve([], keep=keep)
    entry.update(footprint(out, evidence.module_macs))
    return out.evolve([entry])


@prune_pass(WidthPass)
def width(model: PrunedUNet, settings: WidthPass | None = None, evidence: Evidence | None = None) -> PrunedUNet:
    """Keep the best channels of every coupled space, the same number in every GroupNorm group."""
    return _channel_pass(model, settings or WidthPass(), evidence or Evidence(), heads=False)


@prune_pass(HeadsPass)
def heads(model: PrunedUNet, settings: HeadsPass | None = None, evidence: Evidence | None = None) -> PrunedUNet:
    """Keep the best attention heads (scored as whole heads)."""
    return _channel_pass(model, settings or HeadsPass(), evidence or Evidence(), heads=True)


@prune_pass(MaterializePass)
def materialize(model: PrunedUNet, settings: MaterializePass | None = None,
                evidence: Evidence | None = None) -> nn.Module:
    """The target model (built with ``evidence.seed``; its new parts keep that initialisation unless the rules of
    ``materialize.py`` set them), written from the plan: spaces no pass touched keep every channel. Its report entry
    is appended to ``model.plan.report``."""
    settings, evidence = settings or MaterializePass(), evidence or Evidence()
    evidence.say("materialize: inheriting, fitting and initialising the target's tensors")
    stats = evidence.statistics or Calibration()
    stats = replace(stats, inputs=stats.inputs if settings.fold else {},
                    norms=stats.norms if settings.renormalize else {})
    spaces = model.spaces()
    plan = replace(model.plan, keep={s: model.plan.keep.get(s, torch.arange(sp.size)) for s, sp in spaces.items()})
    student = build_target(model.target_config, evidence.seed)
    entry = write_student(model.source, model.teacher_config, student, plan, evidence.pooled_mean, stats)
    entry["parameters_after"] = sum(t.numel() for t in student.state_dict().values())
    model.plan.report.append(entry)
    return student


def chain_problem(passes: list | None, importance: str | None = None) -> str | None:
    """What is wrong with a ``passes:`` list (and the ``importance`` shorthand beside it), or None."""
    kinds = [p.kind for p in passes or []]
    if kinds != sorted(set(kinds), key=PASS_ORDER.index):
        return f"passes: {kinds} must be in chain order ({', '.join(PASS_ORDER)}), each at most once"
    if importance and any(p.kind in ("width", "heads") and p.importance for p in passes or []):
        return "importance: give it, or the width / heads passes' importance, not both"
    return None


def resolve(passes: list | None, calibrated: bool, importance: str | None = None) -> list:
    """The chain a recipe's ``passes:`` asks for: every pass of ``PASS_ORDER`` once, in that order, those left out
    with their defaults, criteria filled in (``importance``: the width criterion, shorthand; heads default to the
    width's) and checked: data-driven criteria need ``calibrated`` evidence."""
    if problem := chain_problem(passes, importance):
        raise DreamliteError(problem)
    by_kind = {p.kind: p for p in passes or []}
    chain = [by_kind.get(k) or cls() for k, cls in zip(PASS_ORDER, (DepthPass, WidthPass, HeadsPass, MaterializePass))]
    depth_s, width_s, heads_s, mat = chain
    if importance:
        width_s = width_s.model_copy(update={"importance": importance})
    label = "--importance" if importance else "passes.width"
    depth_s = depth_s.model_copy(update={"importance": depth_s.importance or default_importance("depth", calibrated)})
    width_s = width_s.model_copy(update={"importance": width_s.importance or default_importance("width", calibrated)})
    heads_s = heads_s.model_copy(update={"importance": heads_s.importance or width_s.importance,
                                         "seed": heads_s.seed if heads_s.seed is not None else width_s.seed})
    for lab, s in (("passes.depth", depth_s), (label, width_s), ("passes.heads", heads_s)):
        _need_data(lab, s.importance, calibrated)
    return [depth_s, width_s, heads_s, mat]


def run_passes(model: PrunedUNet, passes: list | None = None, evidence: Evidence | None = None,
               importance: str | None = None) -> tuple[nn.Module, list[dict]]:
    """Run the chain (``resolve``) on ``model``: the filled target model and the per-pass report."""
    evidence = evidence or Evidence()
    *cuts, last = resolve(passes, evidence.calibrated, importance)
    for settings in cuts:
        model = PASSES[type(settings)](model, settings, evidence)
    return materialize(model, last, evidence), model.plan.report


# ------------------------------------------------------------------------------------------------------- footprint
def footprint(model: PrunedUNet, module_macs: dict[str, int] | None = None) -> dict:
    """``parameters_after`` (and ``macs_after`` given the teacher's MACs per module, ``macs_per_module``) of the
    teacher's layout with the layers and channels kept so far (materialize then changes the layout itself). A conv or
    linear layer's MACs shrink with its weight; attention's own products with its query heads."""
    plan, source, cfg = model.plan, model.source, model.teacher_config
    sizes = {s: sp.size for s, sp in model.spaces().items()}

    def dropped(name: str) -> bool:
        m = LAYER_NAME.match(name)
        if m and m.group(1) in plan.blocks and int(m.group(3)) not in plan.blocks[m.group(1)]:
            return True
        m = re.match(r"^(.*attentions\.\d+)\.transformer_blocks\.(\d+)(\.|$)", name)
        return bool(m and m.group(1) in plan.layers and int(m.group(2)) not in plan.layers[m.group(1)])

    def kept(name: str) -> list[int]:  # the kept size of every dim of one teacher tensor
        shape = source.shape(name)
        return [sum(len(plan.keep[s]) if s in plan.keep else sizes[s] for s in names)
                if names and names != ("text",) else d for names, d in zip(dims_of(name, shape, cfg), shape)]

    out = {"parameters_after": sum(int(np.prod(kept(k))) for k in source.keys() if not dropped(k))}
    if module_macs:
        macs = 0.0
        for module, value in module_macs.items():
            if dropped(module):
                continue
            if f"{module}.weight" in source:
                macs += value * np.prod(kept(f"{module}.weight")) / np.prod(source.shape(f"{module}.weight"))
            elif f"{module}.to_q.weight" in source:
                macs += value * kept(f"{module}.to_q.weight")[0] / source.shape(f"{module}.to_q.weight")[0]
            else:
                macs += value
        out["macs_after"] = int(macs)
    return out
