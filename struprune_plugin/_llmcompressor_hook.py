"""Register `StructPruneModifier` with llm-compressor as soon as both are imported, in any order.

Importing llm-compressor costs seconds, so the plugin does not import it eagerly. If it is already
loaded, the modifier is registered at once; otherwise a one-shot import hook registers it right
after the `llmcompressor` package finishes loading, before any recipe can be parsed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

TARGET = "llmcompressor"  # its __init__ loads core, recipes and modifiers


def _register() -> None:
    importlib.import_module("struprune_plugin.llmcompressor_modifier")  # registers on import


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real spec without us, and fire only once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif importlib.util.find_spec(TARGET) is not None and not any(
        isinstance(f, _RegisterAfterImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())
