"""Where onnxruntime's CUDA provider would put each node of a graph, and the host<->device copies
(Memcpy nodes) that placement needs, predicted on any machine, without a GPU.

Why: onnxruntime refuses to capture a session as a CUDA graph when its partitioned graph holds a
Memcpy node (inference_session.cc, AreAllComputeNodesAssignedToEpOrCpu: CPU-placed shape nodes are
allowed, copies are not), and a decode step that is not captured launches ~300 kernels from the host
per token. The rules below are onnxruntime's, read from its sources (1.25-1.27; the 1.32 wheel holds
the same log strings), and applied in the same order:

1. Assignment: a node goes to CUDA when CUDA has a kernel for its op and types (`CUDA_KERNELS`), else
   to the CPU provider.
2. CPU fallback (framework/fallback_cpu_capability.cc, GetCpuPreferredNodes): the outputs a CUDA
   kernel declares on the host (Shape's) are the first host tensors; their consumers are candidates,
   visited in graph order. A candidate moves to the CPU when none of its inputs is float16, every input
   is a host tensor, a small initializer (<= 100 elements) or a graph input, and no host tensor arrives
   at a slot its CUDA kernel reads on the host anyway (then it stays on CUDA, reading it there).
   Moved nodes' outputs are host tensors and their consumers candidates in turn.
3. Copies (optimizer/transformer_memcpy.cc): a tensor made on the host and read at a device slot needs
   MemcpyFromHost; one made on the device and read on the host (a CPU node, or a slot a CUDA kernel
   reads on the host, such as Slice's starts or GroupQueryAttention's total_sequence_length) needs
   MemcpyToHost; a graph input read at both kinds of slot needs MemcpyFromHost. Initializers are
   duplicated instead, never copied.

It is a model of onnxruntime, not onnxruntime: the GPU check (benchmarks/gpu.sh) is what confirms
a capture on a real device.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

F16 = ("float16", "bfloat16")


@dataclass(frozen=True)
class Kernel:
    host_inputs: frozenset[int] = frozenset()  # slots the CUDA kernel reads on the host (OrtMemTypeCPUInput)
    host_outputs: frozenset[int] = frozenset()  # outputs it writes on the host
    types: tuple[str, ...] | None = None  # input 0's element types it takes (None = every type our graphs use)


def _k(host_in=(), host_out=(), types=None) -> Kernel:
    return Kernel(frozenset(host_in), frozenset(host_out), types)


# The CUDA kernels of the operators our graphs use (and of their plain-ONNX variant), keyed by (domain, op).
CUDA_KERNELS: dict[tuple[str, str], Kernel] = {
    **{("", op): _k() for op in ("Add", "Sub", "Mul", "Div", "Neg", "Cast", "Concat", "Gather", "MatMul", "Tanh",
                                 "Softmax", "Transpose", "Where", "Greater", "LayerNormalization", "ReduceMax", "Pow",
                                 "Identity")},
    ("", "Shape"): _k(host_out=[0]),
    ("", "Slice"): _k(host_in=[1, 2, 3, 4]),
    ("", "Squeeze"): _k(host_in=[1]),
    ("", "Unsqueeze"): _k(host_in=[1]),
    ("", "Range"): _k(host_in=[0, 1, 2]),
    ("", "Reshape"): _k(host_in=[1]),
    ("", "Expand"): _k(host_in=[1]),
    ("", "ReduceSum"): _k(host_in=[1]),
    ("", "Split"): _k(host_in=[1]),
    ("", "Tile"): _k(host_in=[1]),
    ("", "ConstantOfShape"): _k(host_in=[0]),
    ("", "GatherND"): _k(),
    ("", "ArgMax"): _k(types=("float32", "float64", "float16")),  # no integer ArgMax on CUDA
    # GroupQueryAttention's CUDA kernel is float16 / bfloat16 only: a float32 one runs on the CPU provider
    ("com.microsoft", "GroupQueryAttention"): _k(host_in=[6], types=F16),
    ("com.microsoft", "SkipLayerNormalization"): _k(),
    ("com.microsoft", "FastGelu"): _k(),
    ("com.microsoft", "MatMulNBits"): _k(),
    ("com.microsoft", "GatherBlockQuantized"): _k(),
    # no CUDA kernel: DynamicQuantizeMatMul, DynamicQuantizeLinear, MatMulInteger on uint8 (the int8 artifacts)
}


@dataclass
class Copy:
    kind: str  # MemcpyFromHost | MemcpyToHost
    tensor: str
    producer: str  # the node (or "graph input") that makes it
    consumers: list[str]  # the nodes that read it on the other side

    def __str__(self) -> str:
        return f"{self.kind} of {self.tensor} ({self.producer} -> {', '.join(self.consumers)})"


@dataclass
class Placement:
    on_cpu: list[str]  # nodes the CUDA provider leaves to the CPU provider (shape arithmetic is fine)
    copies: list[Copy]  # host<->device copies: any one of them makes onnxruntime refuse graph capture

    @property
    def capturable(self) -> bool:
        return not self.copies


def _dtypes(g) -> dict[str, str]:
    """Element type of every tensor, propagated through the ops our graphs use (enough for the fp16
    rule and GroupQueryAttention's type constraint)."""
    from onnx import helper

    name = lambda t: helper.tensor_dtype_to_np_dtype(t).name if t != 16 else "bfloat16"  # noqa: E731
    out = {v.name: name(v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)}
    out.update({t.name: name(t.data_type) for t in g.initializer})
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Cast":
            t = name(attrs["to"])
        elif n.op_type in ("Shape", "ArgMax"):
            t = "int64"
        elif n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            t = out.get(n.input[2], "float32")  # the scales' type
        elif n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger"):
            t = "float32"
        else:
            t = out.get(n.input[0], "float32") if n.input and n.input[0] else "float32"
        for o in n.output:
            if o and o not in out:
                out[o] = t
    return out


def predict(model) -> Placement:
    """Predict the CUDA provider's placement of `model` (an onnx.ModelProto, external data not needed)."""
    g = model.graph
    nodes = list(g.node)
    dtype = _dtypes(g)
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {v.name for v in g.input} - set(inits)
    small = {n for n, t in inits.items() if _elements(t) <= 100}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)

    def kernel(n) -> Kernel | None:
        k = CUDA_KERNELS.get((n.domain or "", n.op_type))
        if k is not None and k.types is not None and dtype.get(n.input[0]) not in k.types:
            return None
        return k

    cuda = {i: k for i, n in enumerate(nodes) if (k := kernel(n)) is not None}
    # 2. fallback: grow the host region from the outputs CUDA kernels write on the host
    host: set[str] = set()
    queue: list[int] = []
    for i, k in cuda.items():
        for j in k.host_outputs:
            host.add(nodes[i].output[j])
            queue += consumers.get(nodes[i].output[j], [])
    heapq.heapify(queue)
    moved, seen = set(), set()
    while queue:
        i = heapq.heappop(queue)
        if i in seen:
            continue
        seen.add(i)
        n = nodes[i]
        if i in cuda:
            ok = True
            for slot, x in enumerate(n.input):
                if dtype.get(x) in F16:
                    ok = False
                elif x in small or x in graph_inputs:
                    continue
                elif x not in host or slot in cuda[i].host_inputs:
                    ok = False
                if not ok:
                    break
            if not ok:
                continue
            moved.add(i)
        host.update(o for o in n.output if o)
        for o in n.output:
            for c in consumers.get(o, []):
                heapq.heappush(queue, c)
    on_cuda = {i: k for i, k in cuda.items() if i not in moved}
    # 3. copies: where each tensor is made, and where each reader wants it
    made_on: dict[str, tuple[str, str]] = {x: ("input", "graph input") for x in graph_inputs}
    for i, n in enumerate(nodes):
        k = on_cuda.get(i)
        for j, o in enumerate(n.output):
            if o:
                made_on[o] = ("device" if k is not None and j not in k.host_outputs else "host", n.name)
    wanted: dict[str, dict[str, list[str]]] = {}
    for i, n in enumerate(nodes):
        k = on_cuda.get(i)
        for slot, x in enumerate(n.input):
            if x and x not in inits:
                side = "device" if k is not None and slot not in k.host_inputs else "host"
                wanted.setdefault(x, {}).setdefault(side, []).append(n.name)
    copies = []
    for x, sides in wanted.items():
        where, producer = made_on.get(x, ("input", "graph input"))
        if where == "input":
            if len(sides) == 2:
                copies.append(Copy("MemcpyFromHost", x, producer, sides["device"]))
        elif where == "host" and "device" in sides:
            copies.append(Copy("MemcpyFromHost", x, producer, sides["device"]))
        elif where == "device" and "host" in sides:
            copies.append(Copy("MemcpyToHost", x, producer, sides["host"]))
    on_cpu = [nodes[i].name for i in range(len(nodes)) if i not in on_cuda]
    return Placement(on_cpu, copies)


def _elements(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n
