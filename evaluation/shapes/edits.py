"""ImgEdit-style scoring of an edited image on three 1..5 axes, from the record's source and target scenes.

compliance    the changes the instruction asks for (read from the diff of source and target) are present;
seamlessness  no artifacts: grain, and pixels that the parsed scene does not explain (ghosts, smudges, fragments);
preservation  what the instruction did not touch stays as it was (objects, their attributes, the background).
overall = mean of the three, as ImgEdit's item score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .match import diff, distance, match
from .perception import Parsed, artifact_measures, parse
from .spec import Scene

ADD_RADIUS = 0.2  # an added object counts if within this distance of where the instruction put it
REMOVED_RADIUS = 0.1  # a removed object counts as still there if one like it stands this close to where it was
ATTRS = ("shape", "color", "style", "size", "position")
AXES = ("compliance", "seamlessness", "preservation")


@dataclass
class EditScore:
    compliance: float
    seamlessness: float
    preservation: float
    details: dict = field(default_factory=dict)

    @property
    def overall(self) -> float:
        return (self.compliance + self.seamlessness + self.preservation) / 3

    def to_dict(self) -> dict:
        return {k: round(getattr(self, k), 4) for k in (*AXES, "overall")}


def _attr_done(attr: str, src, tgt, out) -> bool:
    """Did ``out`` make the change src -> tgt in ``attr``? Size and position count when they move the right way."""
    if attr in ("shape", "color", "style"):
        return getattr(out, attr) == getattr(tgt, attr)
    if attr == "size":
        want, got = math.log(tgt.size / src.size), math.log(out.size / src.size)
        return got * want > 0 and abs(got) >= 0.5 * abs(want)
    want = np.array([tgt.cx - src.cx, tgt.cy - src.cy])
    got = np.array([out.cx - src.cx, out.cy - src.cy])
    norm = float(np.linalg.norm(want))
    along = float(got @ want) / norm
    across = abs(float(got[0] * want[1] - got[1] * want[0])) / norm
    return along >= 0.5 * norm and across <= 0.15


def deviation(out, tgt, attrs=ATTRS) -> float:
    """0 when ``out`` keeps ``attrs`` of ``tgt``; 1 for a changed identity attribute, a move of >= 0.12 of the canvas
    or a size change of >= 1.4x; graded in between."""
    dev = [1.0 for a in ("shape", "color", "style") if a in attrs and getattr(out, a) != getattr(tgt, a)]
    if "size" in attrs:
        dev.append(np.clip((abs(math.log(out.size / tgt.size)) - 0.15) / 0.2, 0, 1))
    if "position" in attrs:
        dev.append(np.clip((distance(out, tgt) - 0.04) / 0.08, 0, 1))
    return float(max(dev, default=0.0))


def score_scene(parsed: Parsed, source: Scene, target: Scene, artifacts: dict) -> EditScore:
    d = diff(source, target)
    out = parsed.objects
    seen = {j: out[k] for j, k in match(target.objects, out)}
    src, tgt = source.objects, target.objects

    checks: list[tuple[str, bool]] = []
    for j in d.added:
        o, t = seen.get(j), tgt[j]
        ok = o is not None and (o.shape, o.color, o.style) == (t.shape, t.color, t.style) and distance(o, t) <= ADD_RADIUS
        checks.append((f"add {t.ref}", ok))
    leftovers = set()
    for i in d.removed:
        s = src[i]
        still = [k for k, o in enumerate(out) if (o.shape, o.color) == (s.shape, s.color) and distance(o, s) < REMOVED_RADIUS]
        leftovers.update(still)
        checks.append((f"remove {s.ref}", not still))
    for i, j, attrs in d.modified:
        o = seen.get(j)
        checks += [(f"{a} of {src[i].ref}", o is not None and _attr_done(a, src[i], tgt[j], o)) for a in sorted(attrs)]
    if d.background:
        checks.append(("background", parsed.background == target.background))
    done = sum(ok for _, ok in checks)
    compliance = 1 + 4 * done / len(checks) if checks else 5.0

    penalty, notes = 0.0, []
    for i, j in d.untouched:
        o = seen.get(j)
        dev = 1.0 if o is None else deviation(o, tgt[j])
        if dev > 0:
            penalty += 2 * dev
            notes.append(f"{tgt[j].ref} {'lost' if o is None else 'changed'}")
    for i, j, attrs in d.modified:
        if (o := seen.get(j)) is not None and (dev := deviation(o, tgt[j], set(ATTRS) - attrs)) > 0:
            penalty += 2 * dev
            notes.append(f"{tgt[j].ref} changed beyond the edit")
    if not d.background and parsed.background != target.background:
        penalty += 2
        notes.append("background changed")
    matched = {id(o) for o in seen.values()}
    spurious = [o for k, o in enumerate(out) if id(o) not in matched and k not in leftovers]
    penalty += 1.5 * len(spurious)
    notes += [f"unexpected {o.ref}" for o in spurious]
    preservation = max(1.0, 5 - penalty)

    noise_pen = 3 * float(np.clip((artifacts["noise"] - 3) / 9, 0, 1))
    stray_pen = 2 * float(np.clip((artifacts["unexplained"] - 0.002) / 0.02, 0, 1))
    seamlessness = max(1.0, 5 - noise_pen - stray_pen)
    return EditScore(compliance, seamlessness, preservation,
                     {"failed": [n for n, ok in checks if not ok], "preservation": notes, **artifacts})


def score_edit(image, source: Scene, target: Scene) -> EditScore:
    parsed = parse(image)
    return score_scene(parsed, source, target, artifact_measures(image, parsed))
