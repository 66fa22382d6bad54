"""Decoding engines behind one interface (base.DecodeEngine), chosen by name.

The registry is an explicit dict of import paths; engines import lazily so that choosing `torch`
never imports vLLM (and the reverse).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.engines.base import DecodeEngine

ENGINES: dict[str, str] = {
    "torch": "service.engines.torch_engine:TorchEngine",
    "vllm": "service.engines.vllm_engine:VllmEngine",
}
"""Engine name -> "module:Class"."""


def load_engine_class(name: str) -> type[DecodeEngine]:
    """The engine class registered as `name`; ValueError listing the valid names otherwise."""
    if name not in ENGINES:
        raise ValueError(f"unknown decoding engine {name!r}; valid engines: {sorted(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    return getattr(import_module(module_name), class_name)
