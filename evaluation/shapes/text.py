"""Captions and edit instructions: one fixed phrasing for benchmarks (index 0), paraphrases for training.

Every word a template can produce is in ``vocabulary()``, so a text encoder built on it never meets an unknown word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .spec import BACKGROUNDS, COLORS, PLURALS, SHAPES

NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
PREFIXES = ("", "a picture of ", "an image of ", "a drawing of ")
# Regions where "add" puts a new object: phrase -> anchor (cx, cy).
REGIONS = {
    "on the left": (0.2, 0.5), "on the right": (0.8, 0.5), "at the top": (0.5, 0.2), "at the bottom": (0.5, 0.8),
    "in the centre": (0.5, 0.5), "in the top left corner": (0.2, 0.2), "in the top right corner": (0.8, 0.2),
    "in the bottom left corner": (0.2, 0.8), "in the bottom right corner": (0.8, 0.8),
}
DIRECTIONS = ("left", "right", "top", "bottom", "centre")

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "add": ("add {np} {where}", "put {np} {where}", "place {np} {where}", "insert {np} {where}"),
    "remove": ("remove the {ref}", "delete the {ref}", "erase the {ref}", "take away the {ref}"),
    "replace": ("replace the {ref} with {new}", "turn the {ref} into {new}", "change the {ref} into {new}",
                "swap the {ref} for {new}"),
    "alter_color": ("make the {ref} {color}", "change the color of the {ref} to {color}", "paint the {ref} {color}",
                    "recolor the {ref} {color}"),
    "alter_larger": ("make the {ref} larger", "make the {ref} bigger", "enlarge the {ref}", "increase the size of the {ref}"),
    "alter_smaller": ("make the {ref} smaller", "shrink the {ref}", "make the {ref} less big", "reduce the size of the {ref}"),
    "style_outline": ("make the {ref} outlined", "turn the {ref} into an outline", "hollow out the {ref}",
                      "draw the {ref} as an outline"),
    "style_filled": ("fill the {ref}", "make the {ref} filled", "fill in the {ref}", "make the {ref} solid"),
    "background": ("change the background to {bg}", "make the background {bg}", "set the background to {bg}",
                   "turn the background {bg}"),
    "extract": ("keep only the {ref}", "extract the {ref}", "show only the {ref}", "isolate the {ref}"),
    "action": ("move the {ref} to the {direction}", "shift the {ref} to the {direction}",
               "drag the {ref} to the {direction}", "slide the {ref} to the {direction}"),
    "compose": ("{first} and {second}", "{first} then {second}", "{first} and then {second}", "first {first} then {second}"),
}


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(shape: str, color: str | None = None, adjectives: tuple[str, ...] = ()) -> str:
    """'a circle', 'an orange star', 'a small outlined cross'."""
    words = [*adjectives, *([color] if color else []), shape]
    return article(" ".join(words))


def pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    """The benchmark phrasing (index 0) without a generator; a random paraphrase with one."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def instruction(kind: str, rng: np.random.Generator | None = None, **slots: str) -> str:
    return pick(INSTRUCTIONS[kind], rng).format(**slots)


def count_phrase(n: int, shape: str, adjectives: tuple[str, ...] = ()) -> str:
    return " ".join([NUMBERS[n], *adjectives, PLURALS[shape]])


def tokenize(text: str) -> list[str]:
    return text.lower().split()


def vocabulary() -> list[str]:
    """Every word that a caption or instruction of the shapes world can contain, sorted."""
    words: set[str] = set()
    fixed = [*SHAPES, *PLURALS.values(), *COLORS, *BACKGROUNDS, *NUMBERS.values(), "a", "an", "and", "on", "background",
             "small", "large", "outlined", *PREFIXES, *REGIONS, *DIRECTIONS]
    for group in (fixed, *RELATION_PHRASES.values(), *INSTRUCTIONS.values()):
        for text in group:
            words.update(tokenize(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


# The side each object of a position caption is on: "A left of B" puts A on the left and B on the right.
SIDES = ("left", "right", "above", "below")
# the word of each relation phrase that names its side ("to the left of" -> left, "on top of" -> above)
_SIDE_WORDS = {w: relation.split()[0] for relation, phrases in RELATION_PHRASES.items() for phrase in phrases
               for w in phrase.split() if w not in ("to", "the", "of", "on")}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Binding:
    """What a caption says about the object one shape word names: its colour and count, and for a position
    caption the side it is on. ``word`` indexes ``tokenize(caption)``."""
    word: int
    color: str | None
    count: int
    side: str | None


def bindings(caption: str) -> list[Binding]:
    """The objects a text-to-image caption names, one per shape word, in caption order.

    Parses the grammar of ``sample_t2i``'s captions: a colour is the word just before its shape (adjectives come
    before the colour), a count is the word before the plural, and a relation phrase sits between the two noun
    phrases of a position caption."""
    words = tokenize(caption)
    singular = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
    counts = {w: n for n, w in NUMBERS.items()}
    found, side = [], None
    for i, w in enumerate(words):
        if w in _SIDE_WORDS and found and side is None and i + 1 < len(words) and words[i + 1] != "background":
            side = _SIDE_WORDS[w]
        if w not in singular:
            continue
        before = words[:i][::-1]
        color = before[0] if before and before[0] in COLORS else None
        count = next((counts[b] for b in before if b in counts), 1) if w != singular[w] else 1
        found.append([i, color, count])
    out = []
    for k, (i, color, count) in enumerate(found):
        s = None if side is None or len(found) != 2 else (side if k == 0 else _OPPOSITE[side])
        out.append(Binding(i, color, count, s))
    return out
