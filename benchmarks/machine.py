"""The machine a report was measured on: CPU, cores, memory, GPU, package versions, and the memory
bandwidths the report's floor and GB/s columns divide by (the host's read and copy always, the GPU's
device-to-device copy on CUDA); and the GPU memory a process holds."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import numpy as np


def memory_bandwidth_gbs(mb: int = 512) -> dict[str, float]:
    """Best of 7: read (an integer max over `mb` MB, one reader per core) and copy (read + write) GB/s.

    An integer max costs one instruction per 8 values, so it is bound by memory, not arithmetic
    (a float sum is not: on the 2-core AVX2 machine it reads 17 GB/s where the max reads 23 GB/s,
    the rate onnxruntime's own M=1 MatMul reaches on a 512 MB weight)."""
    from concurrent.futures import ThreadPoolExecutor

    n = mb * 2**20 // 4
    src = np.ones(n, np.int32)
    dst = np.empty_like(src)
    cores = os.cpu_count() or 1
    parts = np.array_split(src, 4 * cores)
    read = copy = 0.0
    with ThreadPoolExecutor(cores) as pool:
        for _ in range(7):
            t = time.perf_counter()
            list(pool.map(np.max, parts))  # numpy releases the GIL: one reader per core
            read = max(read, src.nbytes / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            np.copyto(dst, src)
            copy = max(copy, 2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return {"read": read, "copy": copy}


def device_bandwidth_gbs(device: str = "cuda", mb: int = 512, repeats: int = 10) -> float:
    """Memory bandwidth of a torch device, GB/s: the median over `repeats` of a device-to-device copy of
    `mb` MB, counting each byte read and written (2 x mb / time), as CUDA's bandwidthTest counts a
    device-to-device copy. Timed by CUDA events on CUDA (perf_counter elsewhere, which lets a test run
    it on the CPU). Batch-1 decode reads every weight once a token: this is its floor's denominator on a GPU."""
    import torch

    src = torch.ones(mb * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch and the copy kernel's load, untimed
    cuda = src.is_cuda
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * src.nbytes / float(np.median(times)) / 1e9


def _device_bandwidth_in_a_process() -> float:
    """device_bandwidth_gbs() in a spawned process of its own: the harness process then holds no CUDA
    context (and no torch) while the workers run. Raises what the measurement raised."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(device_bandwidth_gbs).result(timeout=300)


def machine_info(provider: str) -> dict:
    """The machine: CPU, cores, memory, GPU, versions, and the memory bandwidths the report's floor and
    GB/s columns divide by: the host's (read, copy) always, the GPU's (device_copy) when `provider` is cuda."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores_logical": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import psutil

        info["cores_physical"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = psutil.virtual_memory().total / 2**30
    except ImportError:
        pass
    info["gpu"] = _gpu_name()
    info["memory_bandwidth_gbs"] = memory_bandwidth_gbs()
    if provider == "cuda":
        try:
            info["memory_bandwidth_gbs"]["device_copy"] = _device_bandwidth_in_a_process()
        except Exception as e:  # e.g. torch without CUDA beside onnxruntime-gpu: the report says which bandwidth it used
            info["device_bandwidth_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    from importlib.metadata import PackageNotFoundError, version

    info["versions"] = {}
    for pkg in ("gpt2onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "torch", "transformers", "optimum", "optimum-onnx",
                "ctranslate2", "llama_cpp_python"):
        try:
            info["versions"][pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return info


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def nvidia_smi_mb() -> dict:
    """GPU memory this process holds, from nvidia-smi ({} where unavailable)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    for line in out.splitlines():
        pid, mb = (x.strip() for x in line.split(","))
        if int(pid) == os.getpid():
            return {"gpu_used_mb": float(mb)}
    return {}
