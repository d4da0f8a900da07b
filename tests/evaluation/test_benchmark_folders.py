import json

import pytest
from PIL import Image

from dreamlite.evaluation.geneval import judge_gen, write_gen_bench
from dreamlite.evaluation.imgedit import judge_edit, read_edits, write_edit_bench
from dreamlite.io import DreamliteError


@pytest.fixture
def gen_dir(tmp_path):
    write_gen_bench(tmp_path / "gen", n_per_tag=2, seed=5, render_samples=True, images_per_prompt=2)
    return tmp_path / "gen"


def test_geneval_layout_and_roundtrip(gen_dir):
    assert (gen_dir / "00000" / "metadata.jsonl").is_file() and (gen_dir / "00011" / "samples" / "0001.png").is_file()
    assert len((gen_dir / "evaluation_metadata.jsonl").read_text().splitlines()) == 12
    results, summary = judge_gen(gen_dir)
    assert len(results) == 24 and set(results[0]) == {"folder", "filename", "tag", "correct", "reason"}
    assert summary["overall"] == 1.0 and len(summary["per_tag"]) == 6


def test_same_seed_same_files(tmp_path):
    for name in ("a", "b"):
        write_gen_bench(tmp_path / name, 1, seed=9, render_samples=True, images_per_prompt=1)
    for p in (tmp_path / "a").rglob("*.*"):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()


def _rewrite_meta(folder, fn):
    path = folder / "00003" / "metadata.jsonl"
    path.write_text(fn(path.read_text()))
    return path


def test_unknown_shape_names_file_line_and_field(gen_dir):
    path = _rewrite_meta(gen_dir, lambda t: json.dumps({**json.loads(t), "include": [{"class": "hexagon", "count": 1}]}))
    with pytest.raises(DreamliteError, match=rf"{path}:1: include\[0\]\.class: unknown shape 'hexagon'"):
        judge_gen(gen_dir)


def test_unknown_colour_and_malformed_line(gen_dir):
    path = _rewrite_meta(gen_dir, lambda t: json.dumps({**json.loads(t), "include": [{"class": "star", "count": 1,
                                                                                      "color": "pink"}]}))
    with pytest.raises(DreamliteError, match=r"include\[0\]\.color: unknown colour 'pink'"):
        judge_gen(gen_dir)
    path.write_text("{not json\n")
    with pytest.raises(DreamliteError, match=rf"{path}:1: invalid JSON"):
        judge_gen(gen_dir)


def test_missing_and_corrupt_images(gen_dir):
    bad = gen_dir / "00002" / "samples" / "0000.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DreamliteError, match=rf"{bad}: not a readable image"):
        judge_gen(gen_dir)


def test_edit_bench_roundtrip_and_errors(tmp_path):
    out = tmp_path / "edit"
    write_edit_bench(out, n_per_type=1, seed=2, render_targets=True)
    records = read_edits(out / "edits.jsonl")
    assert len(records) == 9 and all((out / r["source"]).is_file() for r in records)
    results, summary = judge_edit(out / "edits.jsonl", out / "targets")
    assert summary["overall"] >= 4.8 and set(summary["per_type"]["add"]) == {"overall", "compliance", "seamlessness",
                                                                            "preservation"}
    (out / "targets" / "00004.png").unlink()
    with pytest.raises(DreamliteError, match=r"00004\.png: image not found"):
        judge_edit(out / "edits.jsonl", out / "targets")
    lines = (out / "edits.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    rec["target_scene"]["objects"][0]["color"] = "pink"
    (out / "edits.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(rec)]) + "\n")
    with pytest.raises(DreamliteError, match=r"edits\.jsonl:3: target_scene\.objects\[0\]\.color: unknown colour 'pink'"):
        read_edits(out / "edits.jsonl")
    rec["target_scene"]["objects"][0]["color"] = "red"
    rec["source"] = "../../etc/passwd"
    (out / "edits.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DreamliteError, match="leaves"):
        read_edits(out / "edits.jsonl")


def test_wrong_image_size_is_still_judged(tmp_path, gen_dir):
    sample = gen_dir / "00000" / "samples" / "0000.png"
    Image.open(sample).resize((128, 128), Image.BICUBIC).save(sample)
    results, _ = judge_gen(gen_dir)
    assert results[0]["correct"]
