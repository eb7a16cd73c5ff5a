"""The server's settings: one dataclass, built by the CLI and passed whole."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: a model server is not for the open internet by default
    port: int = 8000
    api_key: str | None = None  # checked on every /v1 route (Authorization: Bearer KEY); /health stays open
    max_body_bytes: int = 1 << 20  # a larger request body gets 413
    max_tokens: int = 512  # cap on max_tokens a request may ask for
    default_max_tokens: int = 16  # when a request names none (OpenAI's completions default)
    request_timeout_s: float = 300.0  # a request still running after this is cancelled (504, or an error event)
    shutdown_timeout_s: float = 30.0  # on SIGTERM: in-flight requests get this long, then are cancelled
    retry_after_s: int = 1  # Retry-After on 429 / 503
    # the scheduler behind each model (see runtime/scheduler.py)
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 64
    threads: int | None = None
    provider: str = "auto"

    def scheduler_config(self):
        """The SchedulerConfig of each model's scheduler."""
        from gpt2onnx.runtime import SchedulerConfig

        return SchedulerConfig(max_batch=self.max_batch, max_queue=self.max_queue, prefill_chunk=self.prefill_chunk)
