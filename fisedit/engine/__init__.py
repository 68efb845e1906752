"""Single-device FISEdit engine: record a generation, then edit it sparsely."""

from fisedit.engine.config import EditConfig, EngineConfig, GenerationParams, SparseConfig
from fisedit.engine.models import (
    DiffusionModel,
    ModelLoadError,
    PromptTruncatedWarning,
    build_tiny_model,
    load_model,
)
from fisedit.engine.session import (
    EditReport,
    EditSession,
    Engine,
    StaleVersionError,
    Version,
)

__all__ = [
    "DiffusionModel",
    "EditConfig",
    "EditReport",
    "EditSession",
    "Engine",
    "EngineConfig",
    "GenerationParams",
    "ModelLoadError",
    "PromptTruncatedWarning",
    "SparseConfig",
    "StaleVersionError",
    "Version",
    "build_tiny_model",
    "load_model",
]
