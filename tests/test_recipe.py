import json
import os
import pytest
import yaml

from dreamlite.compress.distill.heldout import SIGMAS
from dreamlite.evaluation.shapes import GEN_TAGS
from dreamlite.io import DreamliteError
from dreamlite.recipe import load_recipe, report_markdown, run_recipe, stage_kinds

from conftest import REPO

TINY = {"name": "tiny", "seed": 3, "stages": [
    {"kind": "world", "name": "gen", "bench": "gen", "n": 1, "images_per_prompt": 1},
    {"kind": "judge", "name": "judge-gen", "input": "gen"},
    {"kind": "world", "name": "edit", "bench": "edit", "n": 1},
    {"kind": "judge", "name": "judge-edit", "input": "edit"},
]}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.stages and all(s.kind in stage_kinds() for s in recipe.stages)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["stages"][0].update(n_per_tag=3), r"stages\[0\]\.n_per_tag: Extra inputs are not permitted"),
    (lambda d: d["stages"][0].update(n="many"), r"stages\[0\]\.n: Input should be a valid integer"),
    (lambda d: d["stages"][1].update(kind="teleport"), r"stages\[1\]: Input tag 'teleport'"),
    (lambda d: d["stages"][1].update(input="edit"), r"stages\[1\]\.input: 'edit' is not the name of an earlier stage"),
    (lambda d: d.update(colour="red"), r"colour: Extra inputs are not permitted"),
    (lambda d: d["stages"][2].update(name="gen"), r"stages\[2\]\.name: duplicate stage name 'gen'"),
])
def test_bad_recipes_name_the_field(tmp_path, change, message):
    data = json.loads(json.dumps(TINY))
    change(data)
    with pytest.raises(DreamliteError, match=message):
        load_recipe(write(tmp_path, data))


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages:\n  - kind: world\n   bench: gen\n")
    with pytest.raises(DreamliteError, match=rf"{path}:\d+: invalid YAML"):
        load_recipe(path)


def test_run_writes_stages_and_report_then_resumes(tmp_path):
    recipe, out = write(tmp_path, TINY), tmp_path / "run"
    report = run_recipe(recipe, out, log=lambda m: None)
    assert [s["folder"] for s in report["stages"]] == ["01-gen", "02-judge-gen", "03-edit", "04-judge-edit"]
    assert report["stages"][1]["metrics"]["overall"] == 1.0
    assert (out / "report.md").read_text().startswith("# tiny")
    assert all((out / s["folder"] / "metrics.json").is_file() for s in report["stages"])
    logs = []
    again = run_recipe(recipe, out, log=logs.append)
    assert sum("skipped" in m for m in logs) == 4 and again["stages"][1]["metrics"] == report["stages"][1]["metrics"]


def test_interrupted_stage_continues_and_changed_recipe_is_refused(tmp_path):
    recipe, out = write(tmp_path, TINY), tmp_path / "run"
    run_recipe(recipe, out, log=lambda m: None)
    (out / "04-judge-edit").rename(out / "04-judge-edit.partial")  # as if killed before it finished
    (out / "04-judge-edit.partial" / "metrics.json").unlink()
    logs = []
    run_recipe(recipe, out, log=logs.append)
    assert any("judge-edit (judge): resuming" in m for m in logs) and (out / "04-judge-edit" / "metrics.json").is_file()
    changed = json.loads(json.dumps(TINY))
    changed["stages"][0]["n"] = 2
    with pytest.raises(DreamliteError, match="01-gen: finished with a different recipe"):
        run_recipe(write(tmp_path, changed), out, log=lambda m: None)
    report = run_recipe(write(tmp_path, changed), out, restart=True, log=lambda m: None)
    assert report["stages"][0]["metrics"]["prompts"] == 12
    reseeded = changed | {"seed": 4}
    with pytest.raises(DreamliteError, match="01-gen: finished with a different recipe.*seed"):
        run_recipe(write(tmp_path, reseeded), out, log=lambda m: None)


def test_stages_finished_before_the_schema_gained_a_field_are_still_done(tmp_path):
    """A run written by an older dreamlite (whose stage configs lacked fields added since, at their defaults) is
    resumed, not refused; a new field set away from its default is a change."""
    from dreamlite.recipe import _fingerprint

    recipe, out = write(tmp_path, TINY), tmp_path / "run"
    run_recipe(recipe, out, log=lambda m: None)
    before = ""
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):  # rewrite the run as the older version would have
        info = json.loads((folder / "stage.json").read_text())
        info["config"].pop("render", None)  # a top-level field, and a nested one
        info["config"].get("perturb", {}).pop("jpeg", None)
        info["fingerprint"] = before = _fingerprint(info["config"], before)
        (folder / "stage.json").write_text(json.dumps(info))
    logs = []
    run_recipe(recipe, out, log=logs.append)
    assert sum("skipped" in m for m in logs) == 4
    for field, value in (("render", False), ("perturb", {"jpeg": 50})):
        changed = json.loads(json.dumps(TINY))
        changed["stages"][2][field] = value
        with pytest.raises(DreamliteError, match="03-edit: finished with a different recipe"):
            run_recipe(write(tmp_path, changed), out, log=lambda m: None)


def test_an_interrupted_stage_resumes_only_with_the_settings_it_started_with(tmp_path):
    recipe, out = write(tmp_path, TINY), tmp_path / "run"
    run_recipe(recipe, out, log=lambda m: None)
    (out / "03-edit").rename(out / "03-edit.partial")
    (out / "03-edit.partial" / "metrics.json").unlink()
    changed = json.loads(json.dumps(TINY))
    changed["stages"][2]["n"] = 2
    with pytest.raises(DreamliteError, match="03-edit.partial: started with a different recipe"):
        run_recipe(write(tmp_path, changed), out, log=lambda m: None)


def test_same_seed_same_report(tmp_path):
    recipe = write(tmp_path, TINY)
    a = run_recipe(recipe, tmp_path / "a", log=lambda m: None)
    b = run_recipe(recipe, tmp_path / "b", log=lambda m: None)
    strip = lambda r: [s["metrics"] for s in r["stages"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert (tmp_path / "a/01-gen/geneval/00003/samples/0000.png").read_bytes() == \
        (tmp_path / "b/01-gen/geneval/00003/samples/0000.png").read_bytes()


def test_teacher_training_then_bench_then_judge(tmp_path):
    data = {"name": "teach", "seed": 1, "stages": [
        {"kind": "train-teacher", "name": "teacher", "save_dtype": "fp32",
         "train": {"steps": 2, "batch": 2, "warmup": 1, "log_every": 1, "checkpoint_every": 1}},
        {"kind": "bench", "name": "bench", "bench": "gen", "input": "teacher", "n": 1, "images_per_prompt": 1,
         "steps": 2},
        {"kind": "judge", "name": "rejudge", "input": "bench"},
        {"kind": "prune", "name": "student", "input": "teacher", "target": "shapes-mobile", "calib": 1},
        {"kind": "bench", "name": "student-bench", "bench": "gen", "input": "student", "n": 1, "images_per_prompt": 1,
         "steps": 2},
    ]}
    report = run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    teacher, bench, rejudge, student, _ = (s["metrics"] for s in report["stages"])
    assert student["parameters"] == 1_759_472 and student["teacher_parameters"] == teacher["parameters"]
    assert "relative_output_deviation" in student
    assert teacher["steps"] == 2 and teacher["parameters"] > 1e6
    from diffusers import UNet2DConditionModel
    assert UNet2DConditionModel.from_pretrained(tmp_path / "run/01-teacher/model").config.in_channels == 48
    assert bench["images"] == 6 and rejudge["overall"] == bench["overall"]
    assert (tmp_path / "run/02-bench/geneval/grid.png").is_file()


def test_continuing_a_teacher_on_another_target_or_schedule_warns(tmp_path):
    """A recipe written for the epsilon teacher, run on the v / zero-snr one shipped since (or a deliberate switch):
    one warning that names both, and the run goes on."""
    from dreamlite.io import DreamliteWarning
    from dreamlite.models.bundle import from_preset
    from_preset("shapes-server", seed=5).save_pretrained(tmp_path / "src")  # epsilon on sdxl
    data = {"name": "switch", "stages": [{"kind": "train-teacher", "save_dtype": "fp32", "init": str(tmp_path / "src"),
                                          "prediction": "v", "schedule": "zero-snr", "snr_floor": 1.0,
                                          "train": {"steps": 1, "batch": 2, "warmup": 1}}]}
    with pytest.warns(DreamliteWarning, match="predicts epsilon on schedule sdxl; this stage trains v on zero-snr"):
        run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    assert (tmp_path / "run/01-train-teacher/model/scheduler/scheduler_config.json").is_file()


def test_teacher_training_continues_from_a_model(tmp_path):
    """init: a later run continues from a saved teacher (weights, not the optimizer) and counts all its steps;
    input: a later stage continues from an earlier one's."""
    import torch
    from dreamlite.models.bundle import from_preset, load_bundle
    src = from_preset("shapes-server", seed=5)
    src.save_pretrained(tmp_path / "src", trained_steps=100, samples_seen=4000)
    train = {"steps": 1, "batch": 2, "warmup": 1, "lr": 1e-9, "ema": 0}
    data = {"name": "more", "seed": 1, "stages": [
        {"kind": "train-teacher", "name": "teacher", "save_dtype": "fp32", "init": str(tmp_path / "src"),
         "train": train},
        {"kind": "train-teacher", "name": "again", "save_dtype": "fp32", "input": "teacher", "train": train}]}
    run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    out = load_bundle(str(tmp_path / "run/01-teacher/model"))
    assert out.meta["trained_steps"] == 101 and out.meta["samples_seen"] == 4002
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.unet.state_dict().values(),
                                                               src.unet.state_dict().values()))
    again = load_bundle(str(tmp_path / "run/02-again/model"))
    assert again.meta["trained_steps"] == 102 and again.meta["init"] == "stage teacher"
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again.unet.state_dict().values(),
                                                               src.unet.state_dict().values()))


def test_teacher_starts_from_one_model_at_most(tmp_path):
    data = {"name": "more", "stages": [
        {"kind": "train-teacher", "name": "a", "train": {"steps": 1}},
        {"kind": "train-teacher", "init": "zoo:shapes-server", "input": "a", "train": {"steps": 1}}]}
    with pytest.raises(DreamliteError, match="init.*input"):
        run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)


@pytest.mark.parametrize("settings, message", [
    ({"tag_weights": {"positon": 3}}, r"tag_weights\.positon.*'position'"),
    ({"tag_weights": {"position": -1}}, r"tag_weights\.position.*greater than or equal"),
    ({"tag_weights": {t: 0 for t in GEN_TAGS}}, "every tag weighs 0"),
    ({"snr_floor": 8.0}, "snr_floor 8.0 is above snr_gamma 5.0"),
    ({"sampler": {"flow_shift": 3}}, "sampler.flow_shift: applies to flow-matching models; this teacher predicts "
                                     "epsilon"),
    ({"schedule": "zero-snr"}, "schedule: zero-snr needs prediction: v"),
    ({"schedule": "zero-snr", "prediction": "v"}, "snr_floor: with schedule zero-snr the Min-SNR weight of t = 999 "
                                                  "is 0")])
def test_teacher_settings_are_checked_before_training(tmp_path, settings, message):
    data = {"name": "mix", "stages": [{"kind": "train-teacher", **settings, "train": {"steps": 1}}]}
    with pytest.raises(DreamliteError, match=message):
        run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)


def test_teacher_init_must_match_the_preset(tmp_path, tiny_folders):
    data = {"name": "more", "stages": [{"kind": "train-teacher", "init": str(tiny_folders["shapes-mobile"]),
                                        "train": {"steps": 1, "batch": 2}}]}
    with pytest.raises(DreamliteError, match="init: .*U-Net does not match the preset 'shapes-server'"):
        run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)


def test_prune_stage_needs_one_teacher_and_one_target(tmp_path):
    data = {"name": "p", "stages": [{"kind": "prune", "teacher": "shapes-server", "target": "shapes-mobile",
                                     "params": "1M"}]}
    with pytest.raises(DreamliteError, match="exactly one of target, params and macs"):
        load_recipe(write(tmp_path, data))


@pytest.mark.parametrize("passes, message", [
    ([{"pass": "width"}, {"pass": "depth"}], r"passes: \['width', 'depth'\] must be in chain order"),
    ([{"pass": "heads"}, {"pass": "heads"}], "each at most once"),
    ([{"pass": "width", "importance": "weights"}], r"stages\[0\]\.passes\[0\]\.width\.importance: Input should be"),
    ([{"pass": "prune-everything"}], "does not match any of the expected tags"),
])
def test_prune_passes_are_checked_before_anything_runs(tmp_path, passes, message):
    data = {"name": "p", "stages": [{"kind": "prune", "teacher": "shapes-server", "target": "shapes-mobile",
                                     "passes": passes}]}
    with pytest.raises(DreamliteError, match=message):
        load_recipe(write(tmp_path, data))


def test_prune_passes_choose_each_criterion_and_what_materialize_compensates(tmp_path, tiny_folders):
    data = {"name": "p", "seed": 3, "stages": [{
        "kind": "prune", "name": "prune", "teacher": str(tiny_folders["shapes-server"]),
        "target": str(tiny_folders["shapes-mobile"] / "config.json"), "calib": 1,
        "passes": [{"pass": "depth", "importance": "norm"}, {"pass": "width", "importance": "magnitude"},
                   {"pass": "heads", "importance": "random"}, {"pass": "materialize", "renormalize": False}]}]}
    run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    pruning = json.loads((tmp_path / "run/01-prune/model/dreamlite.json").read_text())["pruning"]
    assert pruning["pass_settings"] == [{"pass": "depth", "importance": "norm"},
                                        {"pass": "width", "importance": "magnitude"},
                                        {"pass": "heads", "importance": "random"},
                                        {"pass": "materialize", "fold": True, "renormalize": False}]
    by_pass = {p["pass"]: p for p in pruning["passes"]}
    assert by_pass["width"]["criterion"] == "magnitude" and by_pass["heads"]["criterion"] == "random"
    assert by_pass["materialize"]["renormalized_groupnorms"] == 0 and by_pass["materialize"]["folded_inputs"] > 0


def test_bench_needs_exactly_one_model(tmp_path):
    data = {"name": "b", "stages": [{"kind": "bench", "bench": "gen"}]}
    with pytest.raises(DreamliteError, match="exactly one of input"):
        load_recipe(write(tmp_path, data))


def test_export_quantize_then_bench_the_artifact(tmp_path, tiny_folders):
    data = {"name": "deploy", "seed": 1, "stages": [
        {"kind": "export", "name": "onnx", "model": str(tiny_folders["shallow-mobile"]), "mode": "edit"},
        {"kind": "quantize", "name": "w8a16", "input": "onnx", "calib": 1, "steps": 1},
        {"kind": "bench", "name": "bench", "bench": "gen", "input": "w8a16", "n": 1, "images_per_prompt": 1,
         "steps": 1},
    ]}
    report = run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    onnx, w8a16, bench = (s["metrics"] for s in report["stages"])
    assert onnx["scheme"] == "fp32" and w8a16["scheme"] == "w8a16" and 0 < w8a16["relative_error_vs_fp32"] < 0.5
    import onnx as onnx_lib
    weights = [i for i in onnx_lib.load(tmp_path / "run" / "02-w8a16" / "artifact" / "unet.onnx").graph.initializer
               if len(i.dims) == 4]  # conv kernels: stored as 8-bit integers
    assert weights and all(i.data_type == onnx_lib.TensorProto.UINT8 for i in weights)
    assert bench["images"] == 6


def _recover_stage(student, teacher, steps=1, batch=2, **extra):
    phase = lambda task: {"task": task, "train": {"steps": steps, "batch": batch, "warmup": 1, "log_every": 1,
                                                  "checkpoint_every": 1}}
    return {"kind": "recover", "name": "recover", **student, **teacher, "held_out": 4,
            "phases": [phase("t2i"), phase("edit"), phase("joint")], **extra}


def test_prune_recover_then_edit_and_generate(tmp_path, tiny_folders):
    server = str(tiny_folders["shapes-server"])
    data = {"name": "chain", "seed": 1, "stages": [
        {"kind": "prune", "name": "prune", "teacher": server,
         "target": str(tiny_folders["shapes-mobile"] / "config.json"), "calib": 1},
        _recover_stage({"input": "prune"}, {"teacher": server}, sampler={"steps": 2, "cfg": 2.0}),
        {"kind": "bench", "name": "edit", "bench": "edit", "input": "recover", "n": 1},
        {"kind": "bench", "name": "gen", "bench": "gen", "input": "recover", "n": 1, "images_per_prompt": 1},
        _recover_stage({"input": "recover"}, {"teacher": server}) | {"name": "more", "held_out": 0},
    ]}
    logs = []
    report = run_recipe(write(tmp_path, data), tmp_path / "run", log=logs.append)
    _, recover, edit, gen, more = (s["metrics"] for s in report["stages"])
    assert "held_out" not in more and "held_out_t2i_loss" not in more and more["steps"] == 3  # held_out: 0
    assert list(recover["phases"]) == ["1-t2i", "2-edit", "3-joint"] and recover["steps"] == 3
    before, after = recover["held_out"]["before"], recover["held_out"]["after"]
    assert after["t2i"]["mean"] == recover["held_out_t2i_loss"] and set(after) == set(before) >= {"edit", "source_gain"}
    assert recover["edit_loss_at_sigma_1"] == after["edit"]["per_sigma"]["1.0"]
    assert recover["copy_source_loss"] == before["copy_source"]["mean"] > 0  # the same edits before and after
    teacher_row = recover["held_out"]["teacher"]["t2i"]["per_sigma"]
    assert teacher_row["1.0"] is None and teacher_row["0.5"] > 0  # the server's schedule stops short of sigma 1
    assert recover["teacher_worse_from_sigma"] is None or float(recover["teacher_worse_from_sigma"]) in SIGMAS
    model = tmp_path / "run/02-recover/model"
    meta = json.loads((model / "dreamlite.json").read_text())
    assert meta["prediction"] == "flow" and "schedule" not in meta and meta["sampler"]["steps"] == 2
    from diffusers import DreamLiteUNetModel
    assert DreamLiteUNetModel.from_pretrained(model).config.block_out_channels == [8, 8, 16]
    assert edit["images"] == 9 and 1 <= edit["overall"] <= 5 and gen["images"] == 6
    assert "recover" in (tmp_path / "run/report.md").read_text()
    # the feature projections are kept beside model/ (not in it), and a continuation starts from them
    assert (tmp_path / "run/02-recover/feature_projections.safetensors").is_file()
    assert not list(model.glob("feature_projections*"))
    assert any(m.startswith("continuing the feature projections saved in") for m in logs)
    assert not any("projections start fresh" in m for m in logs)


def test_step_distill_then_export_at_one_branch_and_bench(tmp_path, tiny_folders):
    """A step-distill stage: the gap to the teacher before and after, a model that samples in K calls, and an
    export whose static batch is 1 (guidance distilled) without being told."""
    data = {"name": "steps", "seed": 2, "stages": [
        {"kind": "step-distill", "name": "distill", "model": str(tiny_folders["shallow-mobile"]), "steps": 2,
         "teacher_steps": 4, "cfg": 3.0, "held_out": 1,
         "train": {"steps": 1, "batch": 2, "warmup": 0, "log_every": 1, "checkpoint_every": 1}},
        {"kind": "bench", "name": "gen", "bench": "gen", "input": "distill", "n": 1, "images_per_prompt": 1},
        {"kind": "export", "name": "export", "input": "distill", "mode": "edit"},
    ]}
    report = run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    distill, gen, export = (s["metrics"] for s in report["stages"])
    assert distill["steps"] == 1 and distill["sampling_steps"] == 2 and distill["teacher_cfg"] == 3.0
    assert {f"{task}_gap_{when}" for task in ("t2i", "edit") for when in ("before_guided", "before_one_call", "after")
            } <= set(distill)
    assert all(distill[k] >= 0 for k in distill if "_gap_" in k)
    meta = json.loads((tmp_path / "run/01-distill/model/dreamlite.json").read_text())
    assert meta["stage"] == "step-distill" and meta["sampler"]["steps"] == 2 and meta["sampler"]["cfg"] == 1.0
    assert meta["step_distill"]["guidance"] == "distilled" and meta["step_distill"]["teacher_steps"] == 4
    assert gen["steps"] == 2 and gen["cfg"] == 1.0 and gen["images"] == 6
    manifest = json.loads((tmp_path / "run/03-export/artifact/manifest.json").read_text())
    assert manifest["batch"] == 1 and export["ort_vs_torch_max_abs"] < 1e-3


def test_reward_tune_reports_held_out_rewards_and_writes_a_model_the_bench_samples(tmp_path, tiny_folders):
    """A reward-tune stage on two tags and one edit type: the mean reward of the model's own sampling before and
    after, a model folder that records how it was tuned, and a bench of it."""
    data = {"name": "rl", "seed": 2, "stages": [
        {"kind": "reward-tune", "name": "rl", "model": str(tiny_folders["shallow-mobile"]), "steps": 3,
         "sde_steps": 1, "group": 2, "tags": ["position", "color_attr"], "edit_types": ["remove"], "held_out": 1,
         "train": {"steps": 1, "batch": 4, "warmup": 0, "log_every": 1, "checkpoint_every": 1}},
        {"kind": "bench", "name": "gen", "bench": "gen", "input": "rl", "n": 1, "images_per_prompt": 1, "steps": 2},
    ]}
    report = run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    rl, gen = (s["metrics"] for s in report["stages"])
    assert rl["steps"] == 1 and {f"{t}_reward_{w}" for t in ("t2i", "edit") for w in ("before", "after")} <= set(rl)
    assert all(0 <= rl[k] <= 1 for k in rl if "_reward_" in k)
    meta = json.loads((tmp_path / "run/01-rl/model/dreamlite.json").read_text())
    assert meta["stage"] == "reward-tune" and meta["reward_tune"]["tags"] == ["position", "color_attr"]
    assert meta["reward_tune"]["edit_types"] == ["remove"] and meta["prediction"] == "flow"
    assert gen["images"] == 6


def test_reward_tune_of_a_server_that_cannot_edit_is_refused_before_it_samples(tmp_path, tiny_folders, monkeypatch):
    """A server has no in-context width: the default edit share is refused in one line naming edit_fraction, before
    the held-out rewards are sampled and before anything is trained."""
    import dreamlite.compress.distill.rl as rl

    monkeypatch.setattr(rl, "mean_rewards", lambda *a, **kw: pytest.fail("sampled before the settings were checked"))
    data = {"name": "rl", "stages": [{"kind": "reward-tune", "name": "rl", "model": str(tiny_folders["shapes-server"]),
                                      "steps": 3, "sde_steps": 1, "group": 2, "train": {"steps": 1, "batch": 4}}]}
    with pytest.raises(DreamliteError, match="edit_fraction: .* cannot edit .* set edit_fraction: 0"):
        run_recipe(write(tmp_path, data), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run/01-rl").exists()


def test_reward_tune_names_a_tag_outside_geneval(tmp_path):
    data = {"name": "rl", "stages": [{"kind": "reward-tune", "model": "x", "tags": ["colour"],
                                      "train": {"steps": 1, "batch": 8}}]}
    with pytest.raises(DreamliteError, match=r"stages\[0\].*tags"):
        load_recipe(write(tmp_path, data))


def test_recover_needs_one_student(tmp_path):
    data = {"name": "r", "stages": [_recover_stage({}, {"teacher": "zoo:none"})]}
    with pytest.raises(DreamliteError, match="exactly one of input"):
        load_recipe(write(tmp_path, data))
    data = {"name": "r", "stages": [_recover_stage({"student": "x"}, {}, batch=3) | {
        "phases": [{"task": "joint", "edit_fraction": 0.5, "train": {"steps": 1, "batch": 4, "accumulate": 4}}]}]}
    with pytest.raises(DreamliteError, match=r"stages\[0\]\.phases\[0\]: .*must divide by accumulate"):
        load_recipe(write(tmp_path, data))


@pytest.fixture(scope="module")
def one_process(tiny_folders, tmp_path_factory):
    """A recover stage's recipe and its single-process run (the reference both launches are compared with)."""
    root = tmp_path_factory.mktemp("dist")
    data = {"name": "dist", "seed": 2, "stages": [_recover_stage(
        {"student": str(tiny_folders["shapes-mobile"])}, {"teacher": str(tiny_folders["shapes-server"])},
        steps=2, batch=4)]}
    recipe = write(root, data)
    run_recipe(recipe, root / "one", log=lambda m: None)
    return recipe, root / "one"


@pytest.mark.parametrize("launch, shown", [(["--multi_gpu"], "2 processes (MULTI_CPU)"),
                                           (["--use_fsdp", "--fsdp_version", "2"],
                                            "FSDP2: student, projector sharded over 2 processes"),
                                           (["--cpu"], "Warning: accelerate launch --cpu asked for several "
                                                       "processes and started one")])
def test_two_processes_follow_one_process(tmp_path, tiny_folders, one_process, launch, shown):
    """`accelerate launch` with 2 processes (torchrun; gloo on CPU), as DDP or with the trained modules sharded
    (FSDP2), logs the same losses as one process with the same global batch, writes the same weights, and the same
    checkpoints (so either kind of run resumes the other's). With --cpu, accelerate starts one process (it needs an
    MPI hostfile for more): the run says so and trains as one process does."""
    import subprocess
    import sys
    from safetensors import safe_open
    from safetensors.torch import load_file
    recipe, one_run = one_process
    runs = {"one": one_run, "two": tmp_path / "two"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "dreamlite.cli", "run", str(recipe), "--out", str(runs["two"])]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-6000:]  # the launcher's own traceback takes the last 2,000
    assert shown in done.stdout + done.stderr
    for phase in ("01-t2i", "03-joint"):
        one, two = ((runs[run] / "01-recover/train" / phase / "train_log.csv").read_text().splitlines()
                    for run in ("one", "two"))
        cols = lambda rows: [float(x) for r in rows[1:] for i, x in enumerate(r.split(",")) if i != 2]
        assert one[0] == two[0] and cols(one) == pytest.approx(cols(two), rel=1e-4)
        shapes = []
        for run in ("one", "two"):
            with safe_open(str(runs[run] / "01-recover/train" / phase / "checkpoint.safetensors"), "pt") as f:
                shapes.append({k: f.get_slice(k).get_shape() for k in f.keys()})
        assert shapes[0] == shapes[1]
    w0 = load_file(tiny_folders["shapes-mobile"] / "diffusion_pytorch_model.safetensors")
    w1, w2 = (load_file(runs[run] / "01-recover/model/diffusion_pytorch_model.safetensors") for run in ("one", "two"))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    # gradients differ only by the order of the float reduction; Adam's normalised steps keep that within ~1e-4
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 0.05 * moved


def test_report_tables_show_nested_metrics_as_columns():
    """Tables nested in a stage's metrics (recover's held-out losses per sigma) become rows and columns of numbers,
    not a Python dict printed in a cell."""
    held = {"before": {"t2i": {"mean": 1.25, "per_sigma": {"1.0": 0.5, "0.5": 2.0}}, "copy": {"mean": 0.25}},
            "after": {"t2i": {"mean": 0.125, "per_sigma": {"1.0": 0.25, "0.5": 0.0}}, "copy": {"mean": 0.25}}}
    md = report_markdown({"recipe": "r", "description": "d", "recipe_file": "r.yaml", "seed": 0, "stages": [
        {"folder": "01-recover", "kind": "recover", "seconds": 1.0,
         "metrics": {"steps": 4, "held_out": held, "per_tag": {"a": 0.5}}}]})
    assert "{" not in md
    assert "| | mean | 1.0 | 0.5 |" in md
    assert "| before: t2i | 1.250 | 0.500 | 2.000 |" in md
    assert "| after: copy | 0.250 |  |  |" in md
    assert "| a | 0.500 |" in md
