import json

import pytest
import yaml
from click.testing import CliRunner

from dreamlite.cli import main
from dreamlite.models.bundle import load_bundle

from conftest import tiny_bundle

COMMANDS = [[], ["run"], ["world"], ["world", "gen-bench"], ["world", "edit-bench"], ["world", "preview"], ["judge"],
            ["judge", "gen"], ["judge", "edit"], ["info"], ["sample"], ["edit"], ["bench"], ["bench", "gen"],
            ["bench", "edit"], ["held-out"], ["train-teacher"], ["recover"], ["reward-tune"], ["step-distill"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "dreamlite")
def test_help(cmd):
    result = CliRunner().invoke(main, [*cmd, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_bench_then_judge(tmp_path):
    runner = CliRunner()
    out = tmp_path / "gen"
    r = runner.invoke(main, ["world", "gen-bench", "--n-per-tag", "2", "--seed", "1", "--out", str(out), "--render",
                             "--images-per-prompt", "1", "--noise", "8"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["judge", "gen", str(out), "--json", str(tmp_path / "s.json"),
                             "--results", str(tmp_path / "r.jsonl")])
    assert r.exit_code == 0 and "position" in r.output and "1.000" in r.output
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 12
    r = runner.invoke(main, ["world", "gen-bench", "--n-per-tag", "1", "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output and not (tmp_path / "gen.partial").exists()


def test_edit_bench_judge_and_preview(tmp_path):
    runner = CliRunner()
    out = tmp_path / "edit"
    assert runner.invoke(main, ["world", "edit-bench", "--n-per-type", "1", "--out", str(out), "--render"]).exit_code == 0
    r = runner.invoke(main, ["judge", "edit", "--edits", str(out / "edits.jsonl"), "--images", str(out / "targets")])
    assert r.exit_code == 0 and "compose" in r.output
    r = runner.invoke(main, ["world", "preview", "--out", str(tmp_path / "grid.png")])
    assert r.exit_code == 0 and (tmp_path / "grid.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["judge", "gen", "nowhere"], "nowhere: not a folder"),
    (["judge", "edit", "--edits", "missing.jsonl", "--images", "."], "missing.jsonl: file not found"),
    (["run", "missing.yaml"], "missing.yaml: recipe not found"),
])
def test_bad_input_is_one_line_without_traceback(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_bad_recipe_via_cli(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstages:\n  - kind: world\n    bench: gen\n    sparkle: 1\n")
    r = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "stages[0].sparkle: Extra inputs are not permitted" in r.output
    assert not (tmp_path / "run").exists()


def test_cli_and_recipes_offer_every_registered_importance_criterion():
    # the CLI spells the names out (it must not import torch to parse); the registry is the source of truth
    from typing import get_args

    from dreamlite.compress.prune.importance import CRITERIA, make_importance
    from dreamlite.stages.compress import Criterion

    option = next(p for p in main.commands["prune"].params if p.name == "importance")
    assert tuple(option.type.choices) == CRITERIA == get_args(Criterion)
    assert all(make_importance(c) is not None for c in CRITERIA)


def test_commands_start_without_torchao_warnings_when_the_inc_extra_is_installed():
    # with [inc], torchao is installed and diffusers imports it at start-up: five warnings about CUDA kernels and
    # deprecated registrations, before every command, unless the CLI quiets that import
    pytest.importorskip("torchao")
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "dreamlite.cli", "info", "shapes-mobile", "--json"],
                         capture_output=True, text=True, check=True)
    assert '"parameters": 1759472' in run.stdout
    assert "torchao" not in run.stderr and "register_constant" not in run.stderr, run.stderr


def test_held_out_measures_models_and_the_teacher_on_the_same_samples(tmp_path, tiny_folders):
    mobile, server = str(tiny_folders["shapes-mobile"]), str(tiny_folders["shapes-server"])
    out = tmp_path / "held.json"
    r = CliRunner().invoke(main, ["held-out", mobile, server, "--teacher", server, "--n", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    rows = report["models"]
    assert set(rows["shapes-mobile"]) >= {"t2i", "edit", "source_gain"} and set(rows["shapes-server"]) == {"t2i"}
    assert rows["shapes-server"] == report["teacher"]  # an epsilon model is seen as a flow velocity, as a teacher is
    assert report["teacher"]["t2i"]["per_sigma"]["1.0"] is None  # beyond the server's schedule
    assert report["teacher_worse_from_sigma"]["shapes-server"] is None  # never worse than itself
    assert "source gain" in r.output and "worse target than the data" in r.output


def test_held_out_needs_a_text_encoder_and_a_codec(tmp_path):
    tiny_bundle("shapes-mobile").unet.save_pretrained(tmp_path / "bare")  # a U-Net folder alone
    r = CliRunner().invoke(main, ["held-out", str(tmp_path / "bare"), "--n", "2"])
    assert r.exit_code == 1 and "need a text encoder and a codec" in r.output and "Traceback" not in r.output


ONE_STEP = {"steps": 1, "batch": 2, "warmup": 0, "log_every": 1, "checkpoint_every": 1}


def test_recover_alone_takes_a_recipe_stage_resumes_and_refuses_changed_settings(tmp_path, tiny_folders):
    """`dreamlite recover` runs the recipe's recover stage on a named student, writes a model the sampler loads,
    skips itself when run again, refuses changed settings in one line, and --restart starts over."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "stages": [
        {"kind": "prune", "name": "prune", "teacher": "zoo:shapes-server", "target": "shapes-mobile"},
        {"kind": "recover", "name": "recover", "input": "prune", "teacher": "zoo:shapes-server", "held_out": 0,
         "phases": [{"task": "t2i", "train": ONE_STEP}, {"task": "edit", "train": ONE_STEP}]}]}))
    out = tmp_path / "rec"
    args = ["recover", "--config", str(recipe), "--student", str(tiny_folders["shapes-mobile"]),
            "--teacher", str(tiny_folders["shapes-server"]), "--set", "phases.1.train.lr=1e-4", "--out", str(out)]
    runner = CliRunner()
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    stage = json.loads((out / "stage.json").read_text())
    assert stage["kind"] == "recover" and stage["config"]["teacher"] == str(tiny_folders["shapes-server"])
    assert stage["config"]["phases"][1]["train"]["lr"] == 1e-4 and stage["config"]["phases"][0]["train"]["lr"] == 5e-4
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert load_bundle(str(out / "model")).meta["stage"] == "recover" and not out.with_name("rec.partial").exists()
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "done earlier, skipped" in again.output
    changed = runner.invoke(main, args[:-2] + ["--set", "phases.0.train.lr=1e-3", "--out", str(out)])
    assert changed.exit_code == 1 and "--restart" in changed.output and "Traceback" not in changed.output
    restarted = runner.invoke(main, args[:-2] + ["--set", "phases.0.train.lr=1e-3", "--out", str(out), "--restart"])
    assert restarted.exit_code == 0 and "done earlier" not in restarted.output
    assert json.loads((out / "stage.json").read_text())["config"]["phases"][0]["train"]["lr"] == 1e-3


def test_step_distill_alone_from_options_and_a_stage_file(tmp_path, tiny_folders):
    """`dreamlite step-distill` from a file of the stage's fields plus --set: a model that samples in K calls."""
    fields = tmp_path / "distill.yaml"
    fields.write_text(yaml.safe_dump({"steps": 2, "teacher_steps": 4, "held_out": 0, "train": ONE_STEP}))
    out = tmp_path / "distill"
    r = CliRunner().invoke(main, ["step-distill", "--model", str(tiny_folders["shallow-mobile"]), "--config",
                                  str(fields), "--set", "cfg=3", "--seed", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "model/dreamlite.json").read_text())
    assert meta["stage"] == "step-distill" and meta["sampler"]["steps"] == 2 and meta["step_distill"]["cfg"] == 3.0
    assert json.loads((out / "stage.json").read_text())["seed"] == 4


@pytest.mark.parametrize("args, message", [
    (["recover", "--student", "x"], "recover: phases: Field required"),
    (["recover", "--student", "x", "--set", "phases"], "--set phases: expected KEY=VALUE"),
    (["recover", "--student", "x", "--set", "input=prune"], "--set input: names an earlier stage"),
    (["recover", "--student", "x", "--set", "phases=[{task: t2i, train: {steps: 1}}]", "--set",
      "phases.3.train.steps=2"], "--set phases.3.train.steps: phases has 1 entries"),
    (["recover", "--student", "x", "--set", "phases=[{task: t2j, train: {steps: 1}}]"], "recover: phases[0].task"),
    (["recover", "--config", "recipes/shapes-quick.yaml"], "input: the stage reads an earlier stage ('prune'); give "
                                                          "--student"),
    (["step-distill", "--model", "x", "--config", "recipes/shapes-teacher.yaml"],
     "recipes/shapes-teacher.yaml: the recipe has no step-distill stage"),
    (["reward-tune", "--model", "x", "--config", "recipes/shapes-rl.yaml", "--stage", "tune"],
     "no reward-tune stage named 'tune' (its reward-tune stages: rl)"),
    (["recover", "--student", "x", "--config", "missing.yaml"], "missing.yaml: config not found"),
])
def test_stage_commands_name_what_is_wrong(args, message, tmp_path):
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_stage_commands_do_not_write_into_a_folder_that_is_not_a_stage_run(tmp_path, tiny_folders):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    r = CliRunner().invoke(main, ["step-distill", "--model", str(tiny_folders["shallow-mobile"]), "--set",
                                  "train.steps=1", "--out", str(tmp_path / "o"), "--restart"])
    assert r.exit_code == 1 and "is not a stage's folder" in r.output and (tmp_path / "o" / "keep.txt").is_file()
