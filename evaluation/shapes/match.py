"""Object correspondence between two scenes, and the edit diff derived from it.

Both the judge (output vs. target) and the edit sampler (source vs. target) use the same optimal assignment, so a
record's meaning is read from its two scenes alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

UNMATCHED = 3.0  # cost of leaving an object unpaired; pairs that cost more than twice this stay apart
SIZE_TOL = 0.05  # |log size ratio| above which a size counts as changed
POS_TOL = 0.02  # displacement (canvas fractions) above which a position counts as changed


def distance(a, b) -> float:
    return math.hypot(a.cx - b.cx, a.cy - b.cy)


def pair_cost(a, b) -> float:
    return (2.0 * (a.shape != b.shape) + 2.0 * (a.color != b.color) + 0.5 * (a.style != b.style)
            + abs(math.log(max(a.size, 1e-3) / max(b.size, 1e-3))) + 3.0 * distance(a, b))


def match(a_objs, b_objs, unmatched: float = UNMATCHED) -> list[tuple[int, int]]:
    """Minimum-cost pairing of a_objs with b_objs; each object may instead stay unpaired at cost ``unmatched``."""
    n, m = len(a_objs), len(b_objs)
    if n == 0 or m == 0:
        return []
    big = 1e6
    cost = np.full((n + m, m + n), big)
    cost[:n, :m] = [[pair_cost(a, b) for b in b_objs] for a in a_objs]
    cost[:n, m:] = np.where(np.eye(n, dtype=bool), unmatched, big)
    cost[n:, :m] = np.where(np.eye(m, dtype=bool), unmatched, big)
    cost[n:, m:] = 0.0
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if i < n and j < m]


def changed_attrs(a, b) -> frozenset[str]:
    attrs = {k for k in ("shape", "color", "style") if getattr(a, k) != getattr(b, k)}
    if abs(math.log(a.size / b.size)) > SIZE_TOL:
        attrs.add("size")
    if distance(a, b) > POS_TOL:
        attrs.add("position")
    return frozenset(attrs)


@dataclass
class Diff:
    """What an edit changes: objects added (target index), removed (source index), modified (pairs + attributes)."""
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    modified: list[tuple[int, int, frozenset[str]]] = field(default_factory=list)
    untouched: list[tuple[int, int]] = field(default_factory=list)
    background: bool = False

    def signature(self, source, target) -> frozenset:
        s, t = source.objects, target.objects
        sig = {("add", t[j].shape, t[j].color) for j in self.added}
        sig |= {("remove", s[i].shape, s[i].color) for i in self.removed}
        sig |= {("modify", s[i].shape, s[i].color, attrs) for i, _, attrs in self.modified}
        if self.background:
            sig.add(("background",))
        return frozenset(sig)

    @property
    def n_changes(self) -> int:
        return len(self.added) + len(self.removed) + sum(len(a) for *_, a in self.modified) + int(self.background)


def diff(source, target) -> Diff:
    d = Diff(background=source.background != target.background)
    pairs = match(source.objects, target.objects)
    for i, j in pairs:
        attrs = changed_attrs(source.objects[i], target.objects[j])
        (d.modified.append((i, j, attrs)) if attrs else d.untouched.append((i, j)))
    d.removed = sorted(set(range(len(source.objects))) - {i for i, _ in pairs})
    d.added = sorted(set(range(len(target.objects))) - {j for _, j in pairs})
    return d
