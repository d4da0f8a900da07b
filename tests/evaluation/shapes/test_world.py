import numpy as np
import pytest

from dreamlite.evaluation.shapes import EDIT_TYPES, GEN_TAGS, sample_edit, sample_gen_prompt, sample_t2i, scene_for
from dreamlite.evaluation.shapes.match import diff
from dreamlite.evaluation.shapes.spec import PLURALS, overlaps
from dreamlite.evaluation.shapes.text import PREFIXES, bindings, pick, tokenize, vocabulary
from dreamlite.evaluation.shapes.world import sample_edit_train


def test_same_seed_same_world():
    a = [sample_gen_prompt(np.random.default_rng(7), t) for t in GEN_TAGS]
    b = [sample_gen_prompt(np.random.default_rng(7), t) for t in GEN_TAGS]
    assert a == b
    ra, rb = np.random.default_rng(3), np.random.default_rng(3)
    assert [sample_edit(ra, t) for t in EDIT_TYPES] == [sample_edit(rb, t) for t in EDIT_TYPES]


def test_geneval_prompts_and_metadata():
    rng = np.random.default_rng(0)
    p = sample_gen_prompt(rng, "counting")
    meta = p.metadata()
    assert meta["exclude"] == [{"class": p.objects[0][0], "count": p.count + 1}]
    pos = sample_gen_prompt(rng, "position").metadata()
    assert pos["include"][1]["position"][1] == 0 and pos["prompt"].startswith("a")
    assert sample_gen_prompt(rng, "colors").prompt.split()[-1] in {"circle", "square", "triangle", "diamond", "star", "cross"}
    with pytest.raises(ValueError, match="tag"):
        sample_gen_prompt(rng, "counting_sheep")


@pytest.mark.parametrize("tag", GEN_TAGS)
def test_scenes_never_overlap_and_stay_on_canvas(tag, rng):
    for _ in range(20):
        scene = scene_for(sample_gen_prompt(rng, tag), rng)
        objs = scene.objects
        assert all(not overlaps(a, b) for i, a in enumerate(objs) for b in objs[i + 1:])
        assert all(o.size / 2 <= o.cx <= 1 - o.size / 2 and o.size / 2 <= o.cy <= 1 - o.size / 2 for o in objs)


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_every_edit_changes_the_scene_as_named(edit_type, rng):
    for _ in range(10):
        rec = sample_edit(rng, edit_type)
        d = diff(rec.source, rec.target)
        assert rec.source != rec.target and d.n_changes >= (2 if edit_type == "compose" else 1)


def test_every_caption_and_instruction_is_in_the_vocabulary(rng):
    vocab = set(vocabulary())
    texts = [sample_t2i(rng)[1] for _ in range(300)] + [sample_edit_train(rng).prompt for _ in range(300)]
    assert set().union(*(tokenize(t) for t in texts)) <= vocab
    assert len({t for t in texts}) > 200  # paraphrases, not one phrasing


def test_caption_mix_weights_tags_and_names_colours(rng):
    """tag_weights draws only the weighted tags' scenes; color_captions names each object's own colour."""
    relation_words = {"left", "right", "above", "over", "top", "below", "under", "beneath"}
    for _ in range(30):
        scene, caption = sample_t2i(rng, tag_weights=(0, 0, 0, 0, 1, 0), color_captions=1.0)
        assert len(scene.objects) == 2 and relation_words & set(caption.split())
        for o in scene.objects:  # the colour word stands right before its own shape
            assert f"{o.color} {o.shape}" in caption
    plain = [sample_t2i(rng, tag_weights=(0, 1, 0, 0, 0, 0))[1] for _ in range(30)]
    assert not any(c in t.split() for t in plain for c in ("red", "orange", "yellow", "green", "cyan", "blue",
                                                             "purple", "white"))


SIDE_OF = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@pytest.mark.parametrize("tag", GEN_TAGS)
def test_bindings_read_back_what_each_caption_says_of_each_object(tag, rng):
    """Every paraphrase, prefix, adjective and background suffix of a caption parses back to its prompt's objects:
    shape word, colour, count, and the side of a position caption (the first-named object stands in the relation)."""
    for _ in range(40):
        p = sample_gen_prompt(rng, tag)
        adjectives = (("small",), ("large", "outlined"), ())[int(rng.integers(3))]
        caption = pick(PREFIXES, rng) + p.caption(rng, adjectives) + ("", " on a navy background")[int(rng.integers(2))]
        objects = p.objects[::-1] if tag == "position" else p.objects
        got = bindings(caption)
        words = tokenize(caption)
        assert [words[b.word] for b in got] == [s if p.count == 1 else PLURALS[s] for s, _ in objects]
        assert [b.color for b in got] == [c for _, c in objects] and {b.count for b in got} == {p.count}
        if tag == "position":
            side = SIDE_OF[p.relation]
            assert [b.side for b in got] == [side, OPPOSITE[side]], caption
        else:
            assert {b.side for b in got} == {None}
    assert bindings("") == []
