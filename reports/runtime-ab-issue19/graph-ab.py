"""The two int4 graphs alone, in one process: plain onnxruntime sessions with the runtime's options and its
huge pages (as Engine.load), one decode step at position 40 of a 96-column cache bound by address, 30 steps
a block, the two graphs alternating. Run from /tmp with the new checkout's package on PYTHONPATH:
`python graph-ab.py 40` (the artifacts' paths are the session's, below)."""

import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from gpt2onnx.runtime.session import _anon_regions, _huge_pages

ARTS = {"old": "/tmp/base19/artifacts/dialogpt-small-int4", "new": "/work/main/artifacts/dialogpt-small-int4-head4"}
CAP, AT = 96, 40  # cache columns, the step's position


def setup(path: str):
    m = onnx.load(path + "/model.onnx", load_external_data=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    before = _anon_regions()
    s = ort.InferenceSession(path + "/model.onnx", so, providers=["CPUExecutionProvider"])
    print("huge pages", _huge_pages(before))
    io, keep = s.io_binding(), []
    outs = [o.name for o in m.graph.output]
    for i in m.graph.input:
        if i.name.startswith("past"):
            dt = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            a = np.zeros((1, 12, CAP, 64), dt)  # [batch, heads, capacity, head_dim], past and present alike
            keep.append(a)
            present = "present" + i.name[len("past_key_values"):]
            assert present in outs, (i.name, outs[:4])
            io.bind_input(i.name, "cpu", 0, dt, list(a.shape), a.ctypes.data)
            io.bind_output(present, "cpu", 0, dt, list(a.shape), a.ctypes.data)
    mask = np.zeros((1, CAP), np.int64)
    mask[0, :AT + 1] = 1
    logits = np.zeros((1, 1, 50257), np.float32)
    ins = {"input_ids": np.array([[5]], np.int64), "position_ids": np.array([[AT]], np.int64), "attention_mask": mask,
           "num_logits_to_keep": np.array(1, np.int64)}
    for name, a in ins.items():
        io.bind_cpu_input(name, a)
    io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    return s, io, keep + list(ins.values()) + [logits]


def main() -> None:
    sessions = {k: setup(v) for k, v in ARTS.items()}
    res: dict[str, list[float]] = {k: [] for k in sessions}
    for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20):
        for k in ("old", "new") if rep % 2 == 0 else ("new", "old"):
            s, io, _ = sessions[k]
            ts = []
            for _ in range(30):
                t = time.perf_counter()
                s.run_with_iobinding(io)
                ts.append(time.perf_counter() - t)
            res[k].append(1e3 * statistics.median(ts))
    for k, v in res.items():
        print(k, f"median {statistics.median(v):.3f} ms  min {min(v):.3f}")
    print("new/old", statistics.median(res["new"]) / statistics.median(res["old"]))


if __name__ == "__main__":
    main()
