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
    r = invoke("export", "--model", tiny_folders["shapes-mobile"], "--mode", "edit", "--out", out)
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
    for model in (artifact, tiny_folders["shapes-mobile"]):
        r = invoke("sample", "--model", model, "--prompt", "a red circle", "--steps", 2, "--seed", 3,
                   "--out", tmp_path / f"{model.name}.png")
        assert r.exit_code == 0, r.output
    onnx_img = np.asarray(Image.open(tmp_path / f"{artifact.name}.png"), dtype=int)
    torch_img = np.asarray(Image.open(tmp_path / "shapes-mobile.png"), dtype=int)
    assert np.abs(onnx_img - torch_img).max() <= 2
    r = invoke("edit", "--model", artifact, "--image", tmp_path / "shapes-mobile.png", "--prompt",
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
    # one generation and one edit, 2 steps, 2 and 3 guidance branches through a batch-3 graph: 4 calls
    assert m["calibration"]["denoiser_calls"] == 4 and m["calibration"]["edits"] == 1
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
    (["--keep-float", "no_such_module"], "--keep-float: no node of the graph matches 'no_such_module'"),
])
def test_bad_quantize_input_is_one_line(args, message, artifact, tmp_path):
    r = invoke("quantize", "--model", artifact, "--steps", 1, "--calib", 1, *args, "--out", tmp_path / "o")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def _feeds(artifact, n=2):
    from dreamlite.compress.quantize.artifact import load_artifact, random_feed
    manifest, sess = load_artifact(artifact)
    return manifest, sess, [random_feed(manifest, seed) for seed in range(n)]


def test_a_torch_module_behind_the_session_interface_matches_onnx_runtime(artifact, tiny_folders):
    from dreamlite.compress.quantize.export import UNetGraph
    from dreamlite.compress.quantize.inc import TorchSession, _Input
    from dreamlite.models.bundle import load_bundle
    manifest, sess, feeds = _feeds(artifact)
    unet = load_bundle(str(tiny_folders["shapes-mobile"])).unet.float().eval()
    torch_sess = TorchSession(UNetGraph(unet, *manifest["image_size"]).eval(),
                              [_Input(i["name"], i["shape"]) for i in manifest["inputs"]])
    assert [i.shape[0] for i in torch_sess.get_inputs()][0] == sess.get_inputs()[0].shape[0]
    for feed in feeds:
        assert np.abs(torch_sess.run(None, feed)[0] - sess.run(None, feed)[0]).max() < 1e-4


def test_neural_compressor_int8_stays_close_to_fp32(artifact):
    pytest.importorskip("neural_compressor.torch")
    from dreamlite.compress.quantize.inc import inc_int8_session
    _, sess, feeds = _feeds(artifact, 3)
    int8 = inc_int8_session(artifact, feeds)
    ref, got = sess.run(None, feeds[0])[0], int8.run(None, feeds[0])[0]
    assert got.shape == ref.shape and not np.array_equal(got, ref)  # quantized, so not bit-equal
    assert ((got - ref) ** 2).mean() / (ref ** 2).mean() < 0.05
