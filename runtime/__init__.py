"""The torch-free runtime: onnxruntime + numpy + tokenizers."""

from .artifact import Manifest, load_manifest
from .engine import Engine
from .errors import Gpt2OnnxError, SchedulerClosed
from .prompt_cache import PromptCache
from .request import Result, Stats, Token
from .sampling import GenerationConfig
from .scheduler import Handle, QueueFull, Scheduler, SchedulerConfig
from .session import SessionConfig

__all__ = ["Engine", "GenerationConfig", "Gpt2OnnxError", "Handle", "Manifest", "PromptCache", "QueueFull", "Result",
           "Scheduler", "SchedulerClosed", "SchedulerConfig", "SessionConfig", "Stats", "Token", "load_manifest"]
