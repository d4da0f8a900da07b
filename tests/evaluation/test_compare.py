import json

import pytest
from click.testing import CliRunner

from dreamlite.cli import main
from dreamlite.evaluation.compare import labels_for, pareto_front
from dreamlite.io import DreamliteError


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_pareto_front_keeps_the_points_nothing_smaller_beats():
    #        small+good  big+worse   big+better  same cost, worse  unscored
    points = [(1, 0.5), (4, 0.4), (4, 0.9), (1, 0.3), (2, None)]
    assert pareto_front(points) == [True, False, True, False, False]
    assert pareto_front([(3, 0.2), (3, 0.2)]) == [True, True]  # a tie dominates neither


def test_labels_come_from_paths_and_must_be_unique():
    assert labels_for(["runs/a/02-recover/model", "zoo:shapes-server", "x/y"], []) == \
        ["02-recover/model", "zoo:shapes-server", "y"]
    with pytest.raises(DreamliteError, match="--label: 2 labels for 1 models"):
        labels_for(["a"], ["p", "q"])
    with pytest.raises(DreamliteError, match="'m' names two models"):
        labels_for(["a/m", "b/m"], [])
    with pytest.raises(DreamliteError, match="'a b' names two models"):  # both would be the folder a-b
        labels_for(["x", "y"], ["a b", "a-b"])


def test_compare_benches_every_model_alike_writes_the_table_and_plot_and_reuses_its_benches(tiny_folders, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", tiny_folders["shapes-server"], tiny_folders["shapes-mobile"], "--label", "server", "--label",
            "mobile", "--out", out, "--n-per-tag", 1, "--n-per-type", 1, "--steps", 2, "--cost", "params"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "compare.json").read_text())
    server, mobile = report["rows"]
    assert server["parameters"] > mobile["parameters"] and server["in_context"] is False
    assert server["imgedit"] is None and mobile["imgedit"] is not None  # only the in-context model edits
    assert set(mobile["imgedit_per_type"]) >= {"add", "compose"} and set(server["geneval_per_tag"]) >= {"position"}
    assert mobile["geneval_front"]  # the smallest model is on the front whatever it scores
    assert server["geneval_front"] == (server["geneval"] > mobile["geneval"])
    # the same seed gives both models the same prompts
    prompts = [(out / d / "geneval" / "00005" / "metadata.jsonl").read_text() for d in ("server", "mobile")]
    assert prompts[0] == prompts[1]
    assert (out / "pareto.png").stat().st_size > 0 and "| mobile | diffusers |" in (out / "compare.md").read_text()
    stamp = (out / "mobile" / "imgedit" / "summary.json").stat().st_mtime_ns
    assert invoke(*args).exit_code == 0  # re-running reuses the benches
    assert (out / "mobile" / "imgedit" / "summary.json").stat().st_mtime_ns == stamp
    r = invoke("compare", args[2], args[1], "--label", "mobile", "--label", "server", *args[7:])  # in another order
    assert r.exit_code == 0 and (out / "mobile" / "imgedit" / "summary.json").stat().st_mtime_ns == stamp
    assert [row["label"] for row in json.loads((out / "compare.json").read_text())["rows"]] == ["mobile", "server"]
    r = invoke(*args[:-4], "--steps", 3)  # other sampler settings in the same folder: refused, nothing overwritten
    assert r.exit_code == 1 and "server: benched earlier with other settings" in r.output
    assert r.output.count("Error") == 1 and r.output.strip().splitlines()[-1].startswith("Error: ")


def test_compare_names_a_model_that_does_not_exist(tmp_path):
    r = invoke("compare", tmp_path / "missing", "--out", tmp_path / "cmp")
    assert r.exit_code == 1 and "missing: neither a preset" in r.output
