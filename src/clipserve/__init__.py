"""clipserve: CLIP score and embeddings, as a service and a library.

Public API (imported lazily, so ``import clipserve`` stays cheap)::

    from clipserve import load_model, Settings, Engine, EvalItem, create_app
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "clipserve.local",
    "LocalModel": "clipserve.local",
    "Settings": "clipserve.config",
    "ModelSpec": "clipserve.model_specs",
    "Engine": "clipserve.engine.engine",
    "EvalItem": "clipserve.engine.tasks.evaluate",
    "EvalResult": "clipserve.engine.tasks.evaluate",
    "create_app": "clipserve.api.app",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from clipserve.api.app import create_app as create_app
    from clipserve.config import Settings as Settings
    from clipserve.engine.engine import Engine as Engine
    from clipserve.engine.tasks.evaluate import EvalItem as EvalItem
    from clipserve.engine.tasks.evaluate import EvalResult as EvalResult
    from clipserve.local import LocalModel as LocalModel
    from clipserve.local import load_model as load_model
    from clipserve.model_specs import ModelSpec as ModelSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
