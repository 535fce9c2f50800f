"""Register `StructPruneModifier` with llm-compressor as soon as both are imported, in any order.

Importing llm-compressor costs seconds, so the plugin does not import it eagerly. If it is already
loaded, the modifier is registered at once; otherwise a one-shot import hook registers it right
after the `llmcompressor` package finishes loading, before any recipe can be parsed.

Registration also guards llm-compressor's recipe parsing: `Recipe.from_dict` (llmcompressor
0.14.0.1) reads only top-level keys ending in `_stage` and, inside them, keys ending in
`_modifiers`, and drops every other key without a word. A `StructPruneModifier` entry under
`stage:` or `pruning:` would never run, and `oneshot` would exit 0 after saving the dense model as
if it were pruned. No llm-compressor setting ever reads such an entry, so it is refused as an error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import re
import sys
from collections.abc import Iterator
from typing import Any

from .errors import RecipeError

TARGET = "llmcompressor"  # its __init__ loads core, recipes and modifiers
MODIFIER = "StructPruneModifier"

KeyPath = tuple[Any, ...]  # keys (and list indices) from the recipe's top level down to an entry


def _register() -> None:
    importlib.import_module("struprune_plugin.llmcompressor_modifier")  # registers on import
    _guard_recipe_parsing()


def _guard_recipe_parsing() -> None:
    """Wrap `Recipe.from_dict`, the one place where llm-compressor turns a recipe (YAML, JSON or dict,
    after its `stage=` filter) into modifiers, to check the result against the dict it came from.
    The check runs after llm-compressor's own parse, so its errors (unknown modifier types, bad
    settings) still come first and unchanged; recipes without a StructPruneModifier pass untouched."""
    from llmcompressor.recipe import Recipe

    raw = Recipe.__dict__.get("from_dict")
    if not isinstance(raw, classmethod) or getattr(raw.__func__, "_struprune_checked", False):
        return  # not the method this guard was written against, or already wrapped
    parse = raw.__func__

    @functools.wraps(parse)
    def from_dict(cls, recipe_dict: dict[str, Any]):
        recipe = parse(cls, recipe_dict)
        check_recipe_entries(recipe_dict, recipe.modifiers)
        return recipe

    from_dict._struprune_checked = True
    Recipe.from_dict = classmethod(from_dict)


def check_recipe_entries(recipe_dict: Any, modifiers: list) -> None:
    """Refuse a recipe whose dict holds more StructPruneModifier entries than llm-compressor parsed
    into modifiers: the others sit under keys it skips, so they would never prune anything."""
    from .llmcompressor_modifier import StructPruneModifier

    entries = list(_entries(recipe_dict, ()))
    if len(entries) <= sum(isinstance(m, StructPruneModifier) for m in modifiers):
        return
    skipped = [path for path in entries if not _read_by_llmcompressor(path)]
    raise RecipeError(_skipped_message(skipped[0] if skipped else entries[-1]))


def _entries(node: Any, path: KeyPath) -> Iterator[KeyPath]:
    """Paths to every `StructPruneModifier` key, at any depth, through dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == MODIFIER:
                yield (*path, key)
            else:
                yield from _entries(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _entries(value, (*path, index))


def _is_stage(key: Any) -> bool:
    return isinstance(key, str) and key.endswith("_stage")


def _is_group(key: Any) -> bool:
    return isinstance(key, str) and key.endswith("_modifiers")


def _read_by_llmcompressor(path: KeyPath) -> bool:
    """llm-compressor's rule: `<name>_stage: <name>_modifiers: StructPruneModifier:`, dicts only
    (a list index in the path means a list, which it skips too)."""
    return len(path) == 3 and _is_stage(path[0]) and _is_group(path[1])


def _renamed(key: Any, suffix: str) -> str:
    """`stage` -> `pruning_stage`, `prune` -> `prune_stage`, `prune-stage` -> `prune_stage`."""
    base = re.sub(rf"[\s_-]*{suffix}s?$", "", str(key), flags=re.IGNORECASE).strip() or "pruning"
    return f"{base}_{suffix}"


def _skipped_message(path: KeyPath) -> str:
    where = " -> ".join(str(k) for k in path)
    lost = "so it never runs and oneshot would save the dense model as if it were pruned"
    if len(path) == 3 and not _is_stage(path[0]):
        also = (
            "" if _is_group(path[1]) else f" (and rename {path[1]!r} to '{_renamed(path[1], 'modifiers')}:')"
        )
        return (
            f"recipe key {path[0]!r} holding {MODIFIER} ({where}) does not end in '_stage', and "
            f"llm-compressor skips such keys without a word, {lost}. Fix: rename the key so it ends in "
            f"'_stage', e.g. '{_renamed(path[0], 'stage')}:'{also}"
        )
    if len(path) == 3 and not _is_group(path[1]):
        return (
            f"recipe key {path[1]!r} holding {MODIFIER} ({where}) does not end in '_modifiers', and "
            f"llm-compressor skips such keys without a word, {lost}. Fix: rename the key so it ends in "
            f"'_modifiers', e.g. '{_renamed(path[1], 'modifiers')}:'"
        )
    return (
        f"{MODIFIER} sits at {where}, where llm-compressor never looks (it reads only "
        f"<name>_stage -> <name>_modifiers -> {MODIFIER}, nested mappings), {lost}. Fix: nest it as "
        f"'pruning_stage:' -> 'pruning_modifiers:' -> '{MODIFIER}:'"
    )


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
