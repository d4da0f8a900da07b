"""Seeded samplers: GenEval-style prompts with scenes that satisfy them, and ImgEdit-style edits (source -> target)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import text
from .clauses import relations
from .match import diff
from .render import box
from .spec import (BACKGROUNDS, COLORS, DEFAULT_BACKGROUND, MAX_SIZE, MIN_SIZE, SHAPES, SMALL_MAX, LARGE_MIN, Obj,
                   Scene, placeable)

GEN_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
EDIT_TYPES = ("add", "remove", "replace", "alter", "style", "background", "extract", "action", "compose")
COMPOSABLE = ("add", "remove", "replace", "alter", "style", "background", "action")
RELATION_MARGIN = 0.7  # ground-truth relations hold with this normalised component (GenEval needs > 0.5)


class SamplingError(RuntimeError):
    pass


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _distinct(rng, seq, k):
    return [seq[i] for i in rng.permutation(len(seq))[:k]]


# ----------------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GenPrompt:
    """A GenEval-style prompt. ``objects`` are (shape, colour or None) in include order; for ``position`` the second
    object stands in ``relation`` to the first; for ``counting`` the one object appears ``count`` times."""
    tag: str
    objects: tuple[tuple[str, str | None], ...]
    count: int = 1
    relation: str | None = None

    @property
    def prompt(self) -> str:
        return self.caption()

    def caption(self, rng: np.random.Generator | None = None, adjectives: tuple[str, ...] = ()) -> str:
        """The benchmark phrasing without ``rng``; a paraphrase with it (``adjectives`` go on every object)."""
        nps = [text.noun_phrase(s, c, adjectives) for s, c in self.objects]
        if self.tag == "counting":
            return text.count_phrase(self.count, self.objects[0][0], adjectives)
        if self.tag == "position":
            rel = text.pick(text.RELATION_PHRASES[self.relation], rng)
            return f"{nps[1]} {rel} {nps[0]}"
        return " and ".join(nps)

    def metadata(self) -> dict:
        include = []
        for k, (shape, color) in enumerate(self.objects):
            clause = {"class": shape, "count": self.count}
            if color:
                clause["color"] = color
            if self.tag == "position" and k == 1:
                clause["position"] = [self.relation, 0]
            include.append(clause)
        meta = {"tag": self.tag, "include": include}
        if self.tag == "counting":
            meta["exclude"] = [{"class": self.objects[0][0], "count": self.count + 1}]
        meta["prompt"] = self.prompt
        return meta


def sample_gen_prompt(rng: np.random.Generator, tag: str) -> GenPrompt:
    shapes = _distinct(rng, SHAPES, 2)
    colors = _distinct(rng, list(COLORS), 2)
    if tag == "single_object":
        return GenPrompt(tag, ((shapes[0], None),))
    if tag == "two_object":
        return GenPrompt(tag, ((shapes[0], None), (shapes[1], None)))
    if tag == "counting":
        return GenPrompt(tag, ((shapes[0], None),), count=int(rng.integers(2, 5)))
    if tag == "colors":
        return GenPrompt(tag, ((shapes[0], colors[0]),))
    if tag == "position":
        return GenPrompt(tag, ((shapes[0], None), (shapes[1], None)), relation=_choice(rng, text.RELATIONS))
    if tag == "color_attr":
        return GenPrompt(tag, ((shapes[0], colors[0]), (shapes[1], colors[1])))
    raise ValueError(f"tag: unknown GenEval tag {tag!r} (expected one of {', '.join(GEN_TAGS)})")


def _size(rng, n_objects: int) -> float:
    top = MAX_SIZE if n_objects <= 2 else MAX_SIZE - 0.03 * (n_objects - 1)
    return float(rng.uniform(MIN_SIZE, top))


def _place(rng, shape, color, size, others, style="filled", tries=60) -> Obj | None:
    r = size / 2 + 0.02
    for _ in range(tries):
        o = Obj(shape, color, float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r)), size, style)
        if placeable(o, others):
            return o
    return None


def scene_for(p: GenPrompt, rng: np.random.Generator, background: str = DEFAULT_BACKGROUND,
              style: str = "filled", tries: int = 200) -> Scene:
    """A scene that satisfies prompt ``p`` exactly (free colours and sizes drawn from ``rng``)."""
    specs = [(s, c) for s, c in p.objects for _ in range(p.count)]
    for _ in range(tries):
        objs: list[Obj] = []
        for shape, color in specs:
            o = _place(rng, shape, color or _choice(rng, list(COLORS)), _size(rng, len(specs)), objs, style)
            if o is None:
                break
            objs.append(o)
        else:
            if p.relation is None or _relation_holds(objs[1], objs[0], p.relation):
                return Scene(background, tuple(objs))
    raise SamplingError(f"could not place a scene for {p.prompt!r}")


def _relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    comps = relations(box(a.shape, a.cx, a.cy, a.size), box(b.shape, b.cx, b.cy, b.size), margin=RELATION_MARGIN)
    return comps == {relation}


def sample_t2i(rng: np.random.Generator, tag_weights: tuple[float, ...] | None = None,
               color_captions: float = 0.0) -> tuple[Scene, str]:
    """One training pair: a scene (any tag, background, style) and a paraphrased caption that describes it.

    ``tag_weights``: how often each of ``GEN_TAGS`` is drawn, in that order (default: equally often).
    ``color_captions``: the probability that a two-object caption (two_object, position) also names each object's
    colour, as recaptioning with denser captions does (DALL-E 3): more captions in which a colour must bind to its
    shape. At the defaults the stream is the same draw for draw as before these options existed.
    """
    if tag_weights is None:
        tag = _choice(rng, GEN_TAGS)
    else:
        w = np.asarray(tag_weights, dtype=float)
        tag = GEN_TAGS[int(rng.choice(len(GEN_TAGS), p=w / w.sum()))]
    p = sample_gen_prompt(rng, tag)
    background = DEFAULT_BACKGROUND if rng.random() < 0.5 else _choice(rng, list(BACKGROUNDS))
    style = "outline" if rng.random() < 0.15 else "filled"
    scene = scene_for(p, rng, background, style)
    if color_captions and p.tag in ("two_object", "position") and rng.random() < color_captions:
        p = replace(p, objects=tuple((shape, o.color) for (shape, _), o in zip(p.objects, scene.objects)))
    adjectives: tuple[str, ...] = ("outlined",) if style == "outline" else ()
    if len(scene.objects) == 1 and rng.random() < 0.5:
        size = scene.objects[0].size
        adjectives = (("small",) if size <= SMALL_MAX else ("large",) if size >= LARGE_MIN else ()) + adjectives
    caption = text.pick(text.PREFIXES, rng) + p.caption(rng, adjectives)
    if background != DEFAULT_BACKGROUND or rng.random() < 0.25:
        caption += f" on {text.article(background)} background"
    return scene, caption


# ---------------------------------------------------------------------------------------------------------- edits
@dataclass(frozen=True)
class EditRecord:
    edit_type: str
    prompt: str
    source: Scene
    target: Scene

    def to_dict(self, id: str, source_path: str) -> dict:
        return {"id": id, "edit_type": self.edit_type, "prompt": self.prompt, "source": source_path,
                "source_scene": self.source.to_dict(), "target_scene": self.target.to_dict()}


@dataclass
class _State:
    scene: Scene
    touched: set = field(default_factory=set)  # (color, shape) of objects an earlier op already used
    intended: set = field(default_factory=set)  # the diff signature the ops mean to produce

    def free(self) -> list[Obj]:
        return [o for o in self.scene.objects if (o.color, o.shape) not in self.touched]

    def taken(self, color: str, shape: str) -> bool:
        return any((o.color, o.shape) == (color, shape) for o in self.scene.objects)

    def swap(self, old: Obj, new: Obj | None, attrs: frozenset | None = None) -> None:
        objs = [o for o in self.scene.objects if o is not old] + ([new] if new else [])
        self.scene = self.scene.with_objects(objs)
        self.touched.add((old.color, old.shape))
        if new is not None:
            self.touched.add((new.color, new.shape))
        self.intended.add(("remove", old.shape, old.color) if new is None else ("modify", old.shape, old.color, attrs))


def _op_add(rng, st: _State, phr):
    options = [(s, c) for s in SHAPES for c in COLORS if not st.taken(c, s)]
    shape, color = _choice(rng, options)
    size = float(rng.uniform(MIN_SIZE, 0.28))
    for where in _distinct(rng, list(text.REGIONS), len(text.REGIONS)):
        ax, ay = text.REGIONS[where]
        o = Obj(shape, color, ax + float(rng.uniform(-0.04, 0.04)), ay + float(rng.uniform(-0.04, 0.04)), size)
        if placeable(o, st.scene.objects):
            st.scene = st.scene.with_objects([*st.scene.objects, o])
            st.touched.add((color, shape))
            st.intended.add(("add", shape, color))
            return text.instruction("add", phr, np=text.noun_phrase(shape, color), where=where)
    return None


def _op_remove(rng, st: _State, phr):
    if len(st.scene.objects) < 2 or not st.free():
        return None
    o = _choice(rng, st.free())
    st.swap(o, None)
    return text.instruction("remove", phr, ref=o.ref)


def _op_replace(rng, st: _State, phr):
    if not st.free():
        return None
    o = _choice(rng, st.free())
    options = [s for s in SHAPES if s != o.shape and not st.taken(o.color, s)]
    new = replace(o, shape=_choice(rng, options))
    st.swap(o, new, frozenset({"shape"}))
    return text.instruction("replace", phr, ref=o.ref, new=text.noun_phrase(new.shape))


def _op_alter(rng, st: _State, phr):
    if not st.free():
        return None
    o = _choice(rng, st.free())
    others = [p for p in st.scene.objects if p is not o]
    if rng.random() < 0.6:
        options = [c for c in COLORS if c != o.color and not st.taken(c, o.shape)]
        new = replace(o, color=_choice(rng, options))
        st.swap(o, new, frozenset({"color"}))
        return text.instruction("alter_color", phr, ref=o.ref, color=new.color)
    factor = float(rng.uniform(1.4, 1.6))
    larger = o.size * factor <= MAX_SIZE or (o.size / factor < MIN_SIZE and o.size <= 0.26)
    new = replace(o, size=min(MAX_SIZE, o.size * factor) if larger else max(MIN_SIZE, o.size / factor))
    if abs(np.log(new.size / o.size)) < 0.3 or not placeable(new, others):
        return None
    st.swap(o, new, frozenset({"size"}))
    return text.instruction("alter_larger" if larger else "alter_smaller", phr, ref=o.ref)


def _op_style(rng, st: _State, phr):
    if not st.free():
        return None
    o = _choice(rng, st.free())
    new = replace(o, style="filled" if o.style == "outline" else "outline")
    st.swap(o, new, frozenset({"style"}))
    return text.instruction(f"style_{new.style}", phr, ref=o.ref)


def _op_background(rng, st: _State, phr):
    if ("background",) in st.intended:
        return None
    bg = _choice(rng, [b for b in BACKGROUNDS if b != st.scene.background])
    st.scene = replace(st.scene, background=bg)
    st.intended.add(("background",))
    return text.instruction("background", phr, bg=bg)


def _op_extract(rng, st: _State, phr):
    if len(st.scene.objects) < 2:
        return None
    keep = _choice(rng, st.scene.objects)
    for o in st.scene.objects:
        if o is not keep:
            st.intended.add(("remove", o.shape, o.color))
    if st.scene.background != DEFAULT_BACKGROUND:
        st.intended.add(("background",))
    st.scene = Scene(DEFAULT_BACKGROUND, (keep,))
    return text.instruction("extract", phr, ref=keep.ref)


def _op_action(rng, st: _State, phr):
    if not st.free():
        return None
    o = _choice(rng, st.free())
    others = [p for p in st.scene.objects if p is not o]
    edge = o.size / 2 + 0.04
    targets = {"left": (edge, o.cy), "right": (1 - edge, o.cy), "top": (o.cx, edge), "bottom": (o.cx, 1 - edge),
               "centre": (0.5, 0.5)}
    for direction in _distinct(rng, text.DIRECTIONS, len(text.DIRECTIONS)):
        new = o.moved(*targets[direction])
        if np.hypot(new.cx - o.cx, new.cy - o.cy) >= 0.15 and placeable(new, others):
            st.swap(o, new, frozenset({"position"}))
            return text.instruction("action", phr, ref=o.ref, direction=direction)
    return None


OPS = {"add": _op_add, "remove": _op_remove, "replace": _op_replace, "alter": _op_alter, "style": _op_style,
       "background": _op_background, "extract": _op_extract, "action": _op_action}


def _edit_source(rng, n: int) -> Scene:
    pairs = _distinct(rng, [(s, c) for s in SHAPES for c in COLORS], n)
    objs: list[Obj] = []
    for shape, color in pairs:
        style = "outline" if rng.random() < 0.2 else "filled"
        o = _place(rng, shape, color, float(rng.uniform(MIN_SIZE, 0.32)), objs, style)
        if o is None:
            raise SamplingError("no room")
        objs.append(o)
    background = DEFAULT_BACKGROUND if rng.random() < 0.5 else _choice(rng, list(BACKGROUNDS))
    return Scene(background, tuple(objs))


def sample_edit(rng: np.random.Generator, edit_type: str, paraphrase: bool = False, tries: int = 200) -> EditRecord:
    """An edit of ``edit_type`` whose instruction, source and target agree; the diff of the two scenes is exactly the
    change the instruction names (checked), so records can be scored from their scenes alone."""
    if edit_type not in EDIT_TYPES:
        raise ValueError(f"edit_type: unknown edit type {edit_type!r} (expected one of {', '.join(EDIT_TYPES)})")
    phr = rng if paraphrase else None
    for _ in range(tries):
        kinds = _distinct(rng, COMPOSABLE, 2) if edit_type == "compose" else [edit_type]
        low = 2 if edit_type in ("remove", "extract", "compose") else 1
        try:
            st = _State(_edit_source(rng, int(rng.integers(low, 4))))
        except SamplingError:
            continue
        source = st.scene
        parts = [OPS[k](rng, st, phr) for k in kinds]
        if any(p is None for p in parts):
            continue
        prompt = parts[0] if len(parts) == 1 else text.instruction("compose", phr, first=parts[0], second=parts[1])
        if diff(source, st.scene).signature(source, st.scene) == frozenset(st.intended):
            return EditRecord(edit_type, prompt, source, st.scene)
    raise SamplingError(f"could not sample an unambiguous {edit_type!r} edit")


def sample_edit_train(rng: np.random.Generator) -> EditRecord:
    return sample_edit(rng, _choice(rng, EDIT_TYPES), paraphrase=True)
