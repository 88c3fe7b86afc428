"""Training methods by recipe name: the method class and its config class (imports torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selfe_cli.methods.alphaflow import AlphaFlow
from selfe_cli.methods.base import Method
from selfe_cli.methods.configs import (
    AlphaFlowConfig,
    ECTConfig,
    FlowMatchingConfig,
    IMFConfig,
    IMMConfig,
    SCTConfig,
    SelfEConfig,
    ShortcutConfig,
    TiMConfig,
)
from selfe_cli.methods.ect import ECT
from selfe_cli.methods.flow_matching import FlowMatching
from selfe_cli.methods.imf import IMF
from selfe_cli.methods.imm import IMM
from selfe_cli.methods.meanflow import MeanFlow, MeanFlowConfig
from selfe_cli.methods.sct import SCT
from selfe_cli.methods.selfe import SelfE
from selfe_cli.methods.shortcut import Shortcut
from selfe_cli.methods.tim import TiM


@dataclass(frozen=True)
class MethodEntry:
    cls: type[Method]
    config_class: type


METHODS: dict[str, MethodEntry] = {
    "flow_matching": MethodEntry(FlowMatching, FlowMatchingConfig),
    "meanflow": MethodEntry(MeanFlow, MeanFlowConfig),
    "selfe": MethodEntry(SelfE, SelfEConfig),
    "alphaflow": MethodEntry(AlphaFlow, AlphaFlowConfig),
    "imf": MethodEntry(IMF, IMFConfig),
    "tim": MethodEntry(TiM, TiMConfig),
    "sct": MethodEntry(SCT, SCTConfig),
    "ect": MethodEntry(ECT, ECTConfig),
    "shortcut": MethodEntry(Shortcut, ShortcutConfig),
    "imm": MethodEntry(IMM, IMMConfig),
}


def build_method(name: str, config: Any = None) -> Method:
    entry = METHODS[name]
    return entry.cls(config if config is not None else entry.config_class())


__all__ = ["METHODS", "MethodEntry", "build_method"]
