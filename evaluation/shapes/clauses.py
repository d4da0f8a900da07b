"""GenEval's clause logic (include / exclude / exact count / colour / position), applied to a parsed scene.

Follows GenEval's ``evaluate_images.py``: objects of a class are taken in confidence order (here: best shape fit
first); position shrinks the centre offset by 0.1 x (sum of box sizes) and a relation holds when its normalised
component exceeds 0.5 (y grows downward).
"""
from __future__ import annotations

import numpy as np

from .spec import COLORS, SHAPES

POSITION_THRESHOLD = 0.1
RELATION_NAMES = ("left of", "right of", "above", "below")


class MetadataError(ValueError):
    """A GenEval metadata record that names something outside the shapes world; the message names the field."""


def relations(box_a, box_b, margin: float = 0.5) -> set[str]:
    """Relations of box A to box B (boxes x0, y0, x1, y1), as GenEval's ``relative_position``."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -margin:
        found.add("left of")
    if dx > margin:
        found.add("right of")
    if dy < -margin:
        found.add("above")
    if dy > margin:
        found.add("below")
    return found


def evaluate(objects, metadata: dict) -> tuple[bool, str]:
    """GenEval's verdict on one image: (correct, reason). ``objects`` need .shape, .color, .box, .fit."""
    held, reasons = clause_verdicts(objects, metadata)
    return all(held), "\n".join(reasons)


def clause_verdicts(objects, metadata: dict) -> tuple[list[bool], list[str]]:
    """Whether each clause holds, include clauses then exclude clauses, and the reasons of those that fail. An image
    is correct when all hold; a position clause fails when the clause it refers to failed."""
    by_class: dict[str, list] = {}
    for o in sorted(objects, key=lambda o: o.fit):
        by_class.setdefault(o.shape, []).append(o)
    held, reasons, groups = [], [], []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = by_class.get(cls, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [o.color for o in found]
                if colors.count(req["color"]) < count:
                    matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and matched:
                rel, index = req["position"]
                if groups[index] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for o in found:
                        for target in groups[index]:
                            true_rels = relations(o.box, target.box)
                            if rel not in true_rels:
                                matched = False
                                reasons.append(f"expected {cls} {rel} target, found {' and '.join(true_rels)} target")
                                break
                        if not matched:
                            break
        held.append(matched)
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls = req["class"]
        held.append(len(by_class.get(cls, [])) < req["count"])
        if not held[-1]:
            reasons.append(f"expected {cls}<{req['count']}, found {len(by_class[cls])}")
    return held, reasons


# More pixels than this that fit no background/colour blend and the image is not a scene: the sampler's noise or
# speckle, whose random blobs would otherwise pass as objects (perturbed renders stay below 0.01).
MAX_UNEXPLAINED = 0.10


def judge_parsed(parsed, meta: dict) -> tuple[bool, str]:
    """GenEval's clauses on a parsed image, after refusing images that are not clean scenes."""
    if parsed.unexplained > MAX_UNEXPLAINED:
        return False, f"not a clean scene: {parsed.unexplained:.0%} of pixels fit no background/colour blend"
    return evaluate(parsed.objects, meta)


def clause_credit(parsed, meta: dict) -> float:
    """The share of GenEval's clauses a parsed image meets (1 exactly when it is correct; 0 when it is not a clean
    scene): a graded form of the verdict, for rewards."""
    if parsed.unexplained > MAX_UNEXPLAINED:
        return 0.0
    held, _ = clause_verdicts(parsed.objects, meta)
    return sum(held) / len(held)


def validate_metadata(meta: object, where: str) -> dict:
    """Check a GenEval metadata record against the shapes world; errors name the field (``where`` prefixes them)."""
    if not isinstance(meta, dict):
        raise MetadataError(f"{where}: expected a JSON object")
    for key in ("tag", "include"):
        if key not in meta:
            raise MetadataError(f"{where}: missing {key!r}")
    for part in ("include", "exclude"):
        clauses = meta.get(part, [])
        if not isinstance(clauses, list):
            raise MetadataError(f"{where}: {part}: expected a list")
        for k, clause in enumerate(clauses):
            at = f"{where}: {part}[{k}]"
            if not isinstance(clause, dict):
                raise MetadataError(f"{at}: expected an object")
            if clause.get("class") not in SHAPES:
                raise MetadataError(f"{at}.class: unknown shape {clause.get('class')!r} (expected one of {', '.join(SHAPES)})")
            count = clause.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise MetadataError(f"{at}.count: expected a positive integer, got {count!r}")
            if "color" in clause and clause["color"] not in COLORS:
                raise MetadataError(f"{at}.color: unknown colour {clause['color']!r} (expected one of {', '.join(COLORS)})")
            if "position" in clause:
                pos = clause["position"]
                if (part != "include" or not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATION_NAMES
                        or not isinstance(pos[1], int) or not 0 <= pos[1] < k):
                    raise MetadataError(f"{at}.position: expected [relation, index of an earlier include clause], "
                                        f"relation one of {', '.join(RELATION_NAMES)}; got {pos!r}")
    return meta
