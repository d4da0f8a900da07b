import itertools

import torch

from dreamlite.data import ShapesEdit, ShapesT2I, edit_stream, t2i_stream
from dreamlite.evaluation.shapes import parse
from dreamlite.evaluation.shapes.match import diff


def test_streams_are_seeded_and_endless():
    a = [c for _, c, _ in itertools.islice(t2i_stream(4), 20)]
    b = [c for _, c, _ in itertools.islice(t2i_stream(4), 20)]
    assert a == b and a != [c for _, c, _ in itertools.islice(t2i_stream(5), 20)]


def test_t2i_images_show_their_scene():
    for image, caption, scene in itertools.islice(t2i_stream(0), 10):
        seen = parse(image)
        assert seen.background == scene.background and len(seen.objects) == len(scene.objects), caption


def test_edit_pairs_differ_as_recorded():
    for source, prompt, target, rec in itertools.islice(edit_stream(1), 10):
        assert (source != target).any() and diff(rec.source, rec.target).n_changes >= 1 and prompt


def test_torch_datasets_batch():
    loader = torch.utils.data.DataLoader(ShapesT2I(seed=0, size=32), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].min() >= -1 and len(batch["caption"]) == 4
    edit = next(iter(torch.utils.data.DataLoader(ShapesEdit(seed=0), batch_size=2)))
    assert edit["source"].shape == edit["target"].shape == (2, 3, 64, 64)
