"""The torch-free runtime: onnxruntime + numpy + tokenizers."""

from .artifact import Manifest, load_manifest
from .engine import Engine, PromptCache, SessionConfig, Stats
from .errors import Gpt2OnnxError
from .sampling import GenerationConfig

__all__ = ["Engine", "GenerationConfig", "Gpt2OnnxError", "Manifest", "PromptCache", "SessionConfig", "Stats", "load_manifest"]
