#!/usr/bin/env bash
# The GPU measurement of issue 5, repeatable on a lent GPU machine (see ../shared/tools/ort-gpu.md for
# bringing onnxruntime-gpu there): synthetic:dialogpt-medium fp16 on CUDA, batch 1, prompt 32,
# 128 new tokens, against PyTorch eager fp16 (transformers generate) in the same run, plus batch-64
# tokens/s, a 4-turn chat and 16 concurrent clients (one lease holds ~8 minutes of it: 5 repeats and
# C=1..64 ran past 9). Writes the report into ${OUT:-reports/gpu}.
#
#   PYTHONPATH=/tmp/ort:$PYTHONPATH bash benchmarks/gpu.sh
set -euo pipefail
out="${OUT:-reports/gpu}"
python3 -c "import onnxruntime as o, sys; p = o.get_available_providers(); print(p); sys.exit('CUDAExecutionProvider' not in p)"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python3 -m pip install -q --no-deps -e .
art=artifacts/dialogpt-medium-fp16-cuda
python3 -m gpt2onnx.cli info "$art" >/dev/null 2>&1 || \
  python3 -m gpt2onnx.cli export synthetic:dialogpt-medium -o "$art" --precision fp16 --provider cuda --force
python3 -m gpt2onnx.cli bench "$art" --bench-provider cuda --baselines pytorch --batch 1,64 --prompt-len 32 \
  --new-tokens 128 --repeats 3 --context 50,500,900 --chat-turns 4 --concurrent-clients 16 --concurrent-repeats 1 \
  --out "$out" --cache artifacts/bench-cache
cat "$out/report.md"
