# The two graphs alone, in one process: plain onnxruntime sessions (the runtime's options, weights moved to huge pages as
# Engine.load does), one decode step at position 40 of a 96-column cache bound by address, 30 steps a block,
# the two alternating; run from /tmp with the new checkout's package on PYTHONPATH: `python graph-ab.py 40`.
import time, numpy as np, statistics, onnx, onnxruntime as ort, sys
from onnx import helper
arts = {"old": "/tmp/base19/artifacts/dialogpt-small-int4", "new": "/work/main/artifacts/dialogpt-small-int4-head4"}
CAP, H = 96, 40
def setup(path):
    m = onnx.load(path + "/model.onnx", load_external_data=False)
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL; so.log_severity_level = 3
    from gpt2onnx.runtime.session import _anon_regions, _huge_pages
    before = _anon_regions(); s = ort.InferenceSession(path + "/model.onnx", so, providers=["CPUExecutionProvider"]); print("huge", _huge_pages(before))
    io = s.io_binding(); keep = []
    ins = {i.name: i for i in m.graph.input}
    outs = [o.name for o in m.graph.output]
    for i in m.graph.input:
        if i.name.startswith("past"):
            dt = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            a = np.zeros((1, 12, CAP, 64), dt); keep.append(a)
            io.bind_input(i.name, "cpu", 0, dt, list(a.shape), a.ctypes.data)
            pres = "present" + i.name[len("past_key_values"):] if i.name.startswith("past_key_values") else i.name.replace("past", "present")
            assert pres in outs, (i.name, outs[:4])
            io.bind_output(pres, "cpu", 0, dt, list(a.shape), a.ctypes.data)
    ids = np.array([[5]], np.int64); pos = np.array([[H]], np.int64); mask = np.zeros((1, CAP), np.int64); mask[0, :H + 1] = 1
    logits = np.zeros((1, 1, 50257), np.float32); k = np.array(1, np.int64); keep += [ids, pos, mask, logits, k]
    io.bind_cpu_input("input_ids", ids); io.bind_cpu_input("position_ids", pos); io.bind_cpu_input("attention_mask", mask)
    io.bind_cpu_input("num_logits_to_keep", k)
    io.bind_output("logits", "cpu", 0, np.float32, [1, 1, 50257], logits.ctypes.data)
    return s, io, keep
ss = {k: setup(v) for k, v in arts.items()}
res = {k: [] for k in ss}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20):
    for k in (("old", "new") if rep % 2 == 0 else ("new", "old")):
        s, io, _ = ss[k]
        ts = []
        for _ in range(30):
            t = time.perf_counter(); s.run_with_iobinding(io); ts.append(time.perf_counter() - t)
        res[k].append(1e3 * statistics.median(ts))
for k, v in res.items():
    print(k, f"median {statistics.median(v):.3f} ms  min {min(v):.3f}")
print("new/old", statistics.median(res["new"]) / statistics.median(res["old"]))
