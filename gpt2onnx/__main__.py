"""`python -m gpt2onnx`: the `gpt2onnx` command."""

import sys

from gpt2onnx import main

sys.exit(main())
