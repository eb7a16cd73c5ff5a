"""The torch-free runtime: onnxruntime + numpy + tokenizers."""

from .artifact import Manifest, load_manifest
from .decoder import Decoder
from .engine import Engine
from .errors import Gpt2OnnxError, SchedulerClosed
from .prompt_cache import PromptCache
from .request import Result, Stats, Token
from .sampling import GenerationConfig
from .scheduler import Handle, QueueFull, Scheduler, SchedulerConfig
from .session import SessionConfig
from .spec import IONames, ModelSpec

__all__ = ["Decoder", "Engine", "GenerationConfig", "Gpt2OnnxError", "Handle", "IONames", "Manifest", "ModelSpec",
           "PromptCache", "QueueFull", "Result", "Scheduler", "SchedulerClosed", "SchedulerConfig", "SessionConfig", "Stats",
           "Token", "load_manifest"]
