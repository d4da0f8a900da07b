"""ONNX artifacts: exported with a manifest, checked against torch, sampled through ONNX Runtime, refused when any
file does not match the manifest."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dreamlite.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifact(tiny_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "mobile-edit"
    r = invoke("export", "--model", tiny_folders["shallow-mobile"], "--mode", "edit", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_manifest_describes_the_static_graph(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    shapes = {i["name"]: i["shape"] for i in m["inputs"]}
    assert shapes["sample"] == [3, 48, 16, 32]  # 3 guidance branches, (target | source) width
    assert m["check"]["ort_vs_torch_max_abs"] < 1e-4 * max(1.0, m["check"]["torch_max_abs"])
    assert set(m["files"]) >= {"unet.onnx", "config.json", "dreamlite.json", "text_encoder/model.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_the_artifact_samples_and_edits_through_onnx_runtime(artifact, tiny_folders, tmp_path):
    for model in (artifact, tiny_folders["shallow-mobile"]):
        r = invoke("sample", "--model", model, "--prompt", "a red circle", "--steps", 2, "--seed", 3,
                   "--out", tmp_path / f"{model.name}.png")
        assert r.exit_code == 0, r.output
    onnx_img = np.asarray(Image.open(tmp_path / f"{artifact.name}.png"), dtype=int)
    torch_img = np.asarray(Image.open(tmp_path / "shallow-mobile.png"), dtype=int)
    assert np.abs(onnx_img - torch_img).max() <= 2
    r = invoke("edit", "--model", artifact, "--image", tmp_path / "shallow-mobile.png", "--prompt",
               "make the circle blue", "--steps", 2, "--out", tmp_path / "e.png")
    assert r.exit_code == 0, r.output


def test_a_changed_file_or_an_escaping_path_is_refused(artifact, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / "config.json").write_text((bad / "config.json").read_text() + " ")
    r = invoke("info", bad)
    assert r.exit_code == 1 and "does not match the manifest's sha256" in r.output, r.output
    m = json.loads((artifact / "manifest.json").read_text())
    m["files"]["../outside"] = {"bytes": 1, "sha256": "0" * 64}
    shutil.copy2(artifact / "config.json", bad / "config.json")
    (bad / "manifest.json").write_text(json.dumps(m))
    r = invoke("info", bad)
    assert r.exit_code == 1 and "../outside" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["--mode", "edit"], "--mode edit needs an in-context model"),
    (["--size", "60"], "--size: 60 px is not a multiple"),
])
def test_bad_export_input_is_one_line(args, message, tiny_folders, tmp_path):
    r = invoke("export", "--model", tiny_folders["shapes-server"], *args, "--out", tmp_path / "o")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def w8a16(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "w8a16"
    r = invoke("quantize", "--model", artifact, "--scheme", "w8a16", "--calib", 1, "--steps", 2, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_w8a16_is_calibrated_on_the_samplers_calls_and_stays_close(w8a16, tmp_path):
    m = json.loads((w8a16 / "manifest.json").read_text())
    assert m["scheme"] == "w8a16" and m["calibration"]["activation_type"] == "QUInt16"
    # one generation and one edit, 2 steps, 2 and 3 guidance branches through a batch-3 graph: 4 calls, of which
    # one checks the result and the other 3 calibrate
    assert m["calibration"]["denoiser_calls"] == 3 and m["check"]["held_out_calls"] == 1
    assert m["calibration"]["edits"] == 1
    assert m["check"]["relative_error_vs_fp32"] < 0.05
    r = invoke("sample", "--model", w8a16, "--prompt", "a red circle", "--steps", 2, "--out", tmp_path / "q.png")
    assert r.exit_code == 0, r.output


def test_the_device_kit_runs_standalone_and_matches_its_reference(w8a16):
    """device/run_qnn.py needs only numpy and onnxruntime; on the CPU provider it reproduces check.npz exactly."""
    import subprocess
    import sys
    m = json.loads((w8a16 / "manifest.json").read_text())
    assert {"device/run_qnn.py", "device/check.npz", "device/README.md"} <= set(m["files"])
    done = subprocess.run([sys.executable, str(w8a16 / "device" / "run_qnn.py"), "--provider", "cpu", "--runs", "2"],
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scheme"] == "w8a16" and result["relative_diff_vs_reference"] < 1e-5 and result["ms_median"] > 0


def test_qnn_check_reports_placement_on_the_htp_backend(w8a16, artifact):
    """The session is built with CPU fallback off, so it only builds when every node runs on QNN HTP (DreamLite
    layout: LayerNorms with all-ones gains included, which the exporter merges into shared initializers)."""
    pytest.importorskip("onnxruntime_qnn")
    from dreamlite.compress.quantize.qnn import qnn_check
    report = qnn_check(w8a16, compare=False)
    assert report["nodes"] > 100 and report["passed"] and report["coverage"] == 1.0, report
    r = invoke("qnn-check", artifact, "--no-compare")  # fp32: the HTP backend does not take it
    assert r.exit_code == 1 and "not every node runs on QNN HTP" in r.output


def test_shared_initializers_are_untied_before_quantization(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from dreamlite.compress.quantize.qdq import untie_initializers
    from dreamlite.compress.quantize.artifact import session
    zeros = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])], [zeros])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    assert untie_initializers(path) == 1
    model = onnx.load(path)
    assert [n.input[1] for n in model.graph.node] == ["b", "b__0"] and len(model.graph.initializer) == 2
    x = np.arange(4, dtype=np.float32)
    assert np.array_equal(session(path).run(None, {"x": x})[0], x)


@pytest.mark.parametrize("args, message", [
    (["--calib", "0"], "--calib: 0 calibration samples"),
    (["--keep-float", "no_such_module"], "--keep-float: no node of the graph belongs to module 'no_such_module'"),
])
def test_bad_quantize_input_is_one_line(args, message, artifact, tmp_path):
    r = invoke("quantize", "--model", artifact, "--steps", 1, "--calib", 1, *args, "--out", tmp_path / "o")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_constant_quantization_folds_into_integer_weights(tmp_path):
    """Weights quantized per channel by QuantizeLinear (+ Clip, as torch exports them) are stored as int8; the graph
    computes exactly what it did before."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from dreamlite.compress.quantize.artifact import session
    from dreamlite.compress.quantize.inc import fold_constant_quantization
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0.01, 0.02, 0.05], np.float32), "s"),
             numpy_helper.from_array(np.zeros(3, np.int8), "z"),
             numpy_helper.from_array(np.array(-127, np.int8), "lo"), numpy_helper.from_array(np.array(127, np.int8), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
             helper.make_node("Clip", ["wq", "lo", "hi"], ["wc"]),
             helper.make_node("DequantizeLinear", ["wc", "s", "z"], ["wd"], axis=0),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, tmp_path / "a.onnx")
    assert fold_constant_quantization(model) == 1
    onnx.save(model, tmp_path / "b.onnx")
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    assert {i.name: i.data_type for i in model.graph.initializer}["wc"] == TensorProto.INT8
    assert "w" not in {i.name for i in model.graph.initializer}  # the float weights are gone
    x = rng.standard_normal((2, 3)).astype(np.float32)
    a, b = (session(tmp_path / f"{n}.onnx").run(None, {"x": x})[0] for n in "ab")
    assert np.array_equal(a, b) and np.abs(a).max() > 0


def test_neural_compressor_backend_writes_an_int8_qdq_artifact(artifact, tmp_path):
    pytest.importorskip("neural_compressor.torch")
    r = invoke("quantize", "--model", artifact, "--backend", "inc", "--scheme", "w8a8", "--calib", 1, "--steps", 2,
               "--out", tmp_path / "inc")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "inc" / "manifest.json").read_text())
    fp32 = json.loads((artifact / "manifest.json").read_text())
    assert m["calibration"]["backend"] == "inc" and 0 < m["check"]["relative_error_vs_fp32"] < 0.2
    import onnx
    from onnx import TensorProto, numpy_helper

    def stored(path):  # bytes of initializers by element type
        out = {}
        for i in onnx.load(path).graph.initializer:
            out[i.data_type] = out.get(i.data_type, 0) + numpy_helper.to_array(i).nbytes
        return out
    f, q = stored(artifact / "unet.onnx"), stored(tmp_path / "inc" / "unet.onnx")
    assert q[TensorProto.INT8] > 0.2 * f[TensorProto.FLOAT] / 4 and q[TensorProto.FLOAT] < 0.5 * f[TensorProto.FLOAT]
    assert fp32["scheme"] == "fp32" and m["scheme"] == "w8a8"


def test_every_node_of_the_prepared_graph_knows_its_module(artifact, tmp_path):
    """QNN preprocessing inlines functions and drops the exporter's metadata; modules still reach every node, so
    --keep-float and the sensitivity scan can name U-Net modules."""
    import onnx
    from dreamlite.compress.quantize.qdq import _matching_nodes, prepare_graph
    from dreamlite.compress.quantize.sensitivity import module_groups
    modules = prepare_graph(artifact / "unet.onnx", tmp_path / "pre.onnx")
    assert set(modules) == {n.name for n in onnx.load(tmp_path / "pre.onnx").graph.node}
    groups = module_groups(modules)
    assert {"conv_in", "time_embedding", "down_blocks.0", "mid_block.attentions", "up_blocks.2", "conv_out"} <= set(groups)
    assert len(groups["up_blocks.0"]) > 100 and len(_matching_nodes(modules, ("conv_out",))) >= 1
    assert set(_matching_nodes(modules, ("mid_block",))) == set(groups["mid_block.attentions"] + groups["mid_block.resnets"])


def _three_module_graph(path):
    """x -> a: MatMul by the identity -> b: Exp, Sqrt -> c: Relu. One input column is large, so the tensor inside
    b spans (0, e^8]: a coarse grid there wipes out every small value, which makes b the sensitive module."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h1"], name="a_mm"),
             helper.make_node("Exp", ["h1"], ["h2"], name="b_exp"),
             helper.make_node("Sqrt", ["h2"], ["h3"], name="b_sqrt"),
             helper.make_node("Relu", ["h3"], ["y"], name="c_relu")]
    for node, module in zip(nodes, "abbc"):
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", "unet", f"unet.{module}", "op"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(4)]
    for f in feeds:
        f["x"][:, 0] = 8.0
    return feeds


def test_chunked_calibration_gives_onnx_runtimes_own_ranges(tmp_path):
    """One tensor per session (a budget of 1 byte) and ONNX Runtime's calibrator quantize to the same graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
    from dreamlite.compress.quantize.qdq import _Reader, calibrate, ort_qdq, prepare_graph
    feeds = _three_module_graph(tmp_path / "m.onnx")
    prepare_graph(tmp_path / "m.onnx", tmp_path / "pre.onnx")
    assert calibrate(tmp_path / "pre.onnx", feeds, tmp_path / "ranges.json", budget=1) == 3  # h1, h2, h3 apart
    ort_qdq(tmp_path / "pre.onnx", tmp_path / "ours.onnx", tmp_path / "ranges.json", "w8a16")
    cfg = get_qnn_qdq_config(str(tmp_path / "pre.onnx"), _Reader(feeds), activation_type=QuantType.QUInt16,
                             weight_type=QuantType.QUInt8, per_channel=True)
    quantize(str(tmp_path / "pre.onnx"), str(tmp_path / "theirs.onnx"), cfg)
    ours, theirs = (onnx.load(tmp_path / f"{n}.onnx").graph for n in ("ours", "theirs"))
    assert [(n.op_type, list(n.input)) for n in ours.node] == [(n.op_type, list(n.input)) for n in theirs.node]
    assert {i.name: i.raw_data for i in ours.initializer} == {i.name: i.raw_data for i in theirs.initializer}


def test_the_sensitivity_scan_finds_the_module_that_needs_precision(tmp_path):
    """W8A8: the module whose activations need 16 bits is found, and falling it back removes most of the error.
    (Under W8A16 this graph has no clear culprit; the float probe is tested below.)"""
    scheme = "w8a8"
    from dreamlite.compress.quantize import sensitivity
    from dreamlite.compress.quantize.artifact import session
    from dreamlite.compress.quantize.qdq import _relative_error, calibrate, ort_qdq, prepare_graph
    feeds = _three_module_graph(tmp_path / "m.onnx")
    modules = prepare_graph(tmp_path / "m.onnx", tmp_path / "pre.onnx")
    assert modules == {"a_mm": "a", "b_exp": "b", "b_sqrt": "b", "c_relu": "c"}
    calibrate(tmp_path / "pre.onnx", feeds, tmp_path / "ranges.json")
    ort_qdq(tmp_path / "pre.onnx", tmp_path / "q.onnx", tmp_path / "ranges.json", scheme)
    base = session(tmp_path / "m.onnx")
    report = sensitivity.scan(tmp_path / "q.onnx", tmp_path / "pre.onnx", modules, scheme, base, feeds)
    assert report["modules"][0]["module"] == "b" and report["modules"][0]["gain"] > 0.5 * report["baseline"]
    chosen, nodes = sensitivity.fallback(report, modules, 1)
    assert chosen == ["b"] and nodes == ["b_exp", "b_sqrt"]
    wide = nodes if scheme == "w8a8" else ()
    ort_qdq(tmp_path / "pre.onnx", tmp_path / "q2.onnx", tmp_path / "ranges.json", scheme, () if wide else nodes, wide)
    measured = _relative_error(base, session(tmp_path / "q2.onnx"), feeds)
    assert measured < 0.5 * report["baseline"]


def test_a_float_probe_of_every_module_is_the_float_graph(tmp_path):
    import onnx
    from dreamlite.compress.quantize.artifact import session
    from dreamlite.compress.quantize.qdq import calibrate, ort_qdq, prepare_graph
    from dreamlite.compress.quantize.sensitivity import bypass
    feeds = _three_module_graph(tmp_path / "m.onnx")
    modules = prepare_graph(tmp_path / "m.onnx", tmp_path / "pre.onnx")
    calibrate(tmp_path / "pre.onnx", feeds, tmp_path / "ranges.json")
    ort_qdq(tmp_path / "pre.onnx", tmp_path / "q.onnx", tmp_path / "ranges.json", "w8a16")
    model = onnx.load(tmp_path / "q.onnx")
    floats = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "pre.onnx").graph.initializer}
    assert bypass(model, list(modules), floats) > 0
    # only the graph input stays quantized (16-bit): every module computes in float, on its float weights
    assert {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"} == {"x"}
    assert all(n.op_type == "QuantizeLinear" or n.input[0] != "w_quantized" for n in model.graph.node)
    onnx.save(model, tmp_path / "f.onnx")
    ref, got = session(tmp_path / "m.onnx").run(None, feeds[0])[0], session(tmp_path / "f.onnx").run(None, feeds[0])[0]
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


def test_inc_backend_refuses_schemes_it_does_not_run(artifact, tmp_path):
    r = invoke("quantize", "--model", artifact, "--backend", "inc", "--scheme", "w8a16", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "--backend inc: neural-compressor's static INT8 is W8A8" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_random_calibration_at_batch_one_for_a_model_that_cannot_sample(tiny_folders, tmp_path):
    """A U-Net without its text encoder (as a preset with random weights) exports at batch 1 (guidance-distilled)
    and quantizes on Gaussian feeds whose timesteps cover the schedule; the sampler is refused in one line."""
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(tiny_folders["shallow-mobile"], bare)
    shutil.rmtree(bare / "text_encoder")
    r = invoke("quantize", "--model", bare, "--batch", 1, "--calib", 1, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "has no text encoder" in r.output and "--calib-data random" in r.output, r.output
    assert "export:" not in r.output  # refused before the export, not after it
    assert not (tmp_path / "o").exists()
    r = invoke("quantize", "--model", bare, "--batch", 1, "--calib", 3, "--calib-data", "random",
               "--out", tmp_path / "q")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert "export: fp32 ONNX" in r.output
    assert m["batch"] == 1 and m["inputs"][0]["shape"][0] == 1
    assert m["calibration"]["data"] == "random" and m["calibration"]["denoiser_calls"] == 2
    assert m["check"]["relative_error_vs_fp32"] < 0.15  # on a Gaussian feed neither calibration feed saw
