"""Service configuration: defaults that run offline on the embedded detector, overridable by REWARDSCOPE_* env.
Threshold profiles are model-level data (rewardscope.models.profiles); the service and the CLI read them the
same way, through Scorer(..., profile=...)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from rewardscope.models.profiles import DEFAULT_PROFILE, get_profile
from rewardscope.models.registry import declaration


class ServiceSettings(BaseModel):
    rewards: list[str] = Field(default_factory=lambda: ["matching"], description="rewards loaded and the default set")
    detector: str | None = Field(default=None, description="ONNX detector path; None: embedded YOLOv3-tiny")
    config: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-reward keyword config, e.g. model directories: REWARDSCOPE_CONFIG='{\"caption\": {...}}'",
    )
    profile: str = DEFAULT_PROFILE
    # On CPU small batches keep decoding and inference overlapped (measured in benchmarks/RESULTS.md); raise on GPUs.
    max_batch_size: int = 8
    # Requests predicted (at the measured seconds per item) to finish later than this are refused at once with 503:
    # a latency budget, not a wait. Batches never wait for more requests.
    max_latency_ms: int = 20000
    # Items decoded ahead of the model thread (bounds the decoded pixels held); requests beyond wait to decode.
    max_ahead_items: int = 256
    # Decoded bytes (width x height x 3 per image, read from its header before decoding) held at once by all requests,
    # and by one request: a request over the second is decoded and scored in slices. Memory follows pixels, not items.
    max_ahead_bytes: int = 1536 * 1024 * 1024
    max_request_decoded_bytes: int = 512 * 1024 * 1024
    # A POST body that sends no byte for this long ends with 408; bodies being received hold at most
    # max_receiving_bytes (declared Content-Length) between them. Neither holds an in-flight slot.
    body_idle_timeout_s: float = 5.0
    max_receiving_bytes: int = 512 * 1024 * 1024
    max_items: int = 256
    max_request_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    # /grad: pixels per image, and per forward+backward chunk (its activations are what holds memory).
    max_grad_pixels: int = 1024 * 1024
    grad_chunk_pixels: int = 4 * 512 * 512
    max_concurrency: int = 64  # per worker
    # Batches run side by side (each on its own model thread). A batch that overlaps another runs its detector on
    # one onnxruntime thread; a lone batch uses every core (service/batching.py; figures in benchmarks/RESULTS.md).
    model_lanes: int = 2
    # Threads decoding requests' images (base64, PIL, letterbox) beside the model thread; 0: min(4, CPU count).
    decode_threads: int = 0
    # Worker processes, each with its own models and its own /metrics. On 2 cores one worker with two model lanes
    # is as fast under load as 2 workers were, and a lone request still gets both cores (benchmarks/RESULTS.md).
    workers: int = 1
    timeout_s: int = 300
    # On SIGTERM: stop admitting (503 + Retry-After, /readyz not ready), let requests in flight finish for at most
    # this long, requeue the running job, then exit. Below the process manager's 30 s grace before SIGKILL.
    drain_s: float = 20.0
    # Background jobs: a durable queue (SQLite) in jobs_dir; None: $BENTOML_HOME/rewardscope-jobs.
    jobs_dir: Path | None = None
    max_queued_jobs: int = 16
    max_job_store_bytes: int = 1024 * 1024 * 1024
    job_retention_s: float = 24 * 3600.0
    # gc.freeze() after start-up: the models and libraries loaded then are never rescanned by full collections.
    gc_freeze: bool = True
    token: str | None = Field(default=None, description="bearer token; required for non-loopback listening")
    golden: Path | None = Field(default=None, description="golden expectations file; None: the bundled one")
    golden_check: bool = True
    retry_after_s: int = 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServiceSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(f"REWARDSCOPE_{name.upper()}")
            if raw is None or raw == "":
                continue
            if name == "rewards":
                values[name] = [part.strip() for part in raw.split(",") if part.strip()]
            elif name == "config":
                values[name] = json.loads(raw)
            elif field.annotation is bool:
                values[name] = raw.lower() in ("1", "true", "yes", "on")
            else:
                values[name] = raw
        settings = cls(**values)
        get_profile(settings.profile)  # an unknown name fails at start, not at the first request
        return settings

    def jobs_path(self) -> Path:
        """The job database's file."""
        if self.jobs_dir is not None:
            return self.jobs_dir / "jobs.sqlite3"
        home = os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")
        return Path(home) / "rewardscope-jobs" / "jobs.sqlite3"

    def reward_config(self, rewards: list[str], pin_models: bool = False) -> dict[str, dict[str, Any]]:
        """Per-reward keyword config for a Scorer (its profile is passed beside it): REWARDSCOPE_CONFIG's entry, and
        for rewards that declare a detector, REWARDSCOPE_DETECTOR and the batch size.

        pin_models (the service): each model option not configured is fixed to what the default profile loads, so
        a request naming a profile that needs another model gets a per-item error instead of a model load."""
        config: dict[str, dict[str, Any]] = {}
        for name in rewards:
            # "feedback:/dir" takes its own entry, else the one for its base name ("feedback").
            config[name] = dict(self.config.get(name, self.config.get(name.partition(":")[0], {})))
            declared = declaration(name)
            if declared.uses_detector:
                if self.detector is not None:
                    config[name].setdefault("detector", self.detector)
                config[name].setdefault("batch_size", self.max_batch_size)
            if pin_models:
                loaded = get_profile(self.profile).for_reward(name)
                for option, default in declared.model_options:
                    config[name].setdefault(option, loaded.get(option, default))
        return config
