"""Single-device FISEdit engine: record a generation, then edit it sparsely.

The names below load on first use, so that light modules (config, masks) import without
diffusers: the command line checks its input with them before it loads anything heavy.
"""

import importlib

_MODULE_OF = {
    "DiffusionModel": "models",
    "EditConfig": "config",
    "EditReport": "session",
    "EditSession": "session",
    "Engine": "session",
    "EngineConfig": "config",
    "GenerationParams": "config",
    "ModelLoadError": "models",
    "NoChangeWarning": "session",
    "PromptTruncatedWarning": "models",
    "SparseConfig": "config",
    "UneditableSessionWarning": "session",
    "UnknownVersionError": "session",
    "Version": "session",
    "build_tiny_model": "models",
    "load_model": "models",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
