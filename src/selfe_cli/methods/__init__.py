"""Training methods on the two-time network: registry by recipe name.

The names below are imported on first use (PEP 562), so that ``selfe_cli.methods.configs`` (the recipe's
``method:`` sections) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selfe_cli.methods.base import LossOutput, Method, unwrap
    from selfe_cli.methods.registry import METHODS, MethodEntry, build_method

_EXPORTS = {
    "METHODS": "selfe_cli.methods.registry",
    "MethodEntry": "selfe_cli.methods.registry",
    "build_method": "selfe_cli.methods.registry",
    "LossOutput": "selfe_cli.methods.base",
    "Method": "selfe_cli.methods.base",
    "unwrap": "selfe_cli.methods.base",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "LossOutput", "Method", "MethodEntry", "build_method", "unwrap"]
