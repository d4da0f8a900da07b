"""Check an artifact on Qualcomm's QNN HTP backend (onnxruntime-qnn; on Linux x86_64 the HTP runs as a host
simulator). The session is built with CPU fallback disabled, so it only builds if every node runs on QNN; a second
session with fallback reports which ops did not, when that fails. The output is compared with ONNX Runtime's CPU
provider on one recorded-shape feed (the simulator's numerics are not trustworthy at every shape: a difference is
reported, not judged)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dreamlite.io import DreamliteError

from .artifact import GRAPH, random_feed, session, verify


def _qnn():
    try:
        import onnxruntime as ort
        import onnxruntime_qnn as qnn
    except ImportError:
        raise DreamliteError("qnn-check: onnxruntime-qnn is not installed (pip install 'dreamlite[qnn]' "
                             "-c constraints.txt; Linux x86_64 and Windows on Snapdragon)") from None
    if qnn.EP_NAME not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(qnn.EP_NAME, qnn.get_library_path())
    return ort, qnn


def qnn_session(path: Path, fallback: bool):
    ort, qnn = _qnn()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == qnn.EP_NAME]
    opts.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path()})
    return ort.InferenceSession(str(path), opts)


def _placement(sess) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for sub in sess.get_provider_graph_assignment_info():
        out.setdefault(sub.ep_name, Counter()).update(n.op_type for n in sub.get_nodes())
    return out


def _place(folder: Path) -> dict:
    try:
        sess, error = qnn_session(folder / GRAPH, fallback=False), None
    except Exception as e:  # ORT raises its own exception types; the message names the failing node
        sess, error = None, str(e).strip().splitlines()[0]
    if sess is None:
        try:
            sess = qnn_session(folder / GRAPH, fallback=True)
        except Exception as e:
            return {"error": error, "fallback_error": str(e).strip().splitlines()[0], "placement": {}}
    return {"error": error, "placement": {ep: dict(c) for ep, c in _placement(sess).items()}}


def _compare(folder: Path, manifest: dict, seed: int) -> dict:
    feed = random_feed(manifest, seed)
    cpu = session(folder / GRAPH).run(None, feed)[0]
    htp = qnn_session(folder / GRAPH, fallback=False).run(None, feed)[0]
    return {"relative_diff_vs_cpu": round(float(np.sqrt(((htp - cpu) ** 2).mean() / max((cpu ** 2).mean(), 1e-12))),
                                          5)}


def _in_child(what: str, folder: Path, seed: int = 0, timeout: int = 1800) -> dict:
    """Run a QNN step in a child process: the HTP simulator can crash the process (it segfaults running some
    graphs), and a crash must become a report, not take the CLI down."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from pathlib import Path; from dreamlite.compress.quantize import qnn; "
            "from dreamlite.compress.quantize.artifact import verify; f = Path(sys.argv[2]); "
            "r = qnn._place(f) if sys.argv[1] == 'place' else qnn._compare(f, verify(f), int(sys.argv[3])); "
            "print('RESULT ' + json.dumps(r))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, what, str(folder), str(seed)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"crashed": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"crashed": f"exit {proc.returncode}" + (f": {tail}" if tail else "")}


def qnn_check(folder, compare: bool = True, seed: int = 0, timeout: int = 1800) -> dict:
    """{"passed", "nodes", "on_qnn", "coverage", "not_on_qnn" (op type -> count), "error",
    "relative_diff_vs_cpu" (or "compare_error")}."""
    folder = Path(folder)
    manifest = verify(folder)
    _qnn()
    placed = _in_child("place", folder, timeout=timeout)
    if "crashed" in placed:
        placed = {"error": f"building the QNN session crashed ({placed['crashed']})", "placement": {}}
    placement = {ep: Counter(ops) for ep, ops in placed["placement"].items()}
    on_qnn = sum(placement.get("QNNExecutionProvider", Counter()).values())
    total = sum(sum(c.values()) for c in placement.values())
    others = Counter()
    for ep, ops in placement.items():
        if ep != "QNNExecutionProvider":
            others.update(ops)
    error = placed.get("error") or placed.get("fallback_error")
    report = {"artifact": str(folder), "scheme": manifest["scheme"], "passed": error is None and total > 0 and
              on_qnn == total, "nodes": total, "on_qnn": on_qnn, "coverage": round(on_qnn / max(total, 1), 4),
              "not_on_qnn": dict(others), "error": error}
    if compare and report["passed"]:
        result = _in_child("compare", folder, seed, timeout)
        if "crashed" in result:
            report["compare_error"] = f"the HTP simulator failed running the graph ({result['crashed']})"
        else:
            report.update(result)
    return report
