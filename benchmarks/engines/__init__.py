"""One module per engine under measurement, each holding its worker-side runner and, for the
external engines, how the Hugging Face checkpoint becomes that engine's model (conversion, export)."""

from __future__ import annotations

import importlib

# kind -> (module, runner class): imported in the worker that runs it, never in the harness
RUNNERS = {
    "ours": ("ours", "Ours"),
    "pytorch": ("pytorch", "PyTorch"),
    "pytorch-compile": ("pytorch", "PyTorchCompiled"),
    "optimum": ("optimum", "Optimum"),
    "llamacpp": ("llamacpp", "LlamaCpp"),
    "ctranslate2": ("ctranslate2", "CTranslate2"),
}


def runner_class(kind: str):
    module, name = RUNNERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{module}", None), name)
