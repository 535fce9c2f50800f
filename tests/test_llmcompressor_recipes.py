"""Recipes that llm-compressor would misread: StructPruneModifier under keys it skips (a stage key
without `_stage`, a group key without `_modifiers`), and misspelt modifier settings. Each must stop
the run with one clear line, never end in a dense model saved as if pruned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
llmcompressor = pytest.importorskip("llmcompressor")

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.recipe import Recipe  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import struprune_plugin  # noqa: E402,F401  (registers the modifier and guards recipe parsing)
from struprune_plugin.errors import RecipeError, StructPruneError  # noqa: E402
from struprune_plugin.llmcompressor_modifier import StructPruneModifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
pruning_stage:
  pruning_modifiers:
    StructPruneModifier:
      sparsity: 0.3
"""


def structprune_modifiers(recipe: Recipe) -> list[StructPruneModifier]:
    return [m for m in recipe.modifiers if isinstance(m, StructPruneModifier)]


# -- item A: keys llm-compressor skips --------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            GOOD.replace("pruning_stage:", "stage:"),
            r"recipe key 'stage' .* does not end in '_stage'.* Fix: rename the key so it ends in '_stage', "
            r"e\.g\. 'pruning_stage:'$",
        ),
        (
            GOOD.replace("pruning_stage:", "structprune:"),
            r"recipe key 'structprune' .* Fix: .* e\.g\. 'structprune_stage:'$",
        ),
        (
            GOOD.replace("pruning_modifiers:", "pruning:"),
            r"recipe key 'pruning' .* does not end in '_modifiers'.* e\.g\. 'pruning_modifiers:'$",
        ),
        (
            GOOD.replace("pruning_stage:", "stage:").replace("pruning_modifiers:", "modifiers:"),
            r"recipe key 'stage' .* e\.g\. 'pruning_stage:' \(and rename 'modifiers' to 'pruning_modifiers:'\)$",
        ),
        (  # no group level at all
            "pruning_stage:\n  StructPruneModifier:\n    sparsity: 0.3\n",
            r"StructPruneModifier sits at pruning_stage -> StructPruneModifier, where llm-compressor never "
            r"looks.* Fix: nest it as",
        ),
        (  # a list instead of a mapping
            "pruning_stage:\n  - pruning_modifiers:\n      StructPruneModifier:\n        sparsity: 0.3\n",
            r"StructPruneModifier sits at pruning_stage -> 0 -> pruning_modifiers -> StructPruneModifier",
        ),
    ],
    ids=["stage", "bare-name", "group", "stage-and-group", "no-group", "list"],
)
def test_structprune_under_a_key_llmcompressor_skips_is_refused(recipe, message):
    """llm-compressor 0.14.0.1 parses each of these into 0 modifiers and carries on."""
    with pytest.raises(RecipeError, match=message) as caught:
        Recipe.create_instance(recipe)
    text = str(caught.value)
    assert "\n" not in text and "dense model" in text and "Fix: " in text


def test_a_skipped_entry_next_to_a_read_one_is_refused_too():
    recipe = GOOD + GOOD.replace("pruning_stage:", "second:")
    with pytest.raises(RecipeError, match="recipe key 'second'"):
        Recipe.create_instance(recipe)


def test_recipes_llmcompressor_reads_fully_are_left_alone(tmp_path):
    """The guard must not refuse what llm-compressor runs: well-formed recipes, a `stage=` filter
    that leaves the pruning stage out on purpose, a mention in a comment only, and other modifiers
    under skipped keys (not this plugin's to judge)."""
    assert len(structprune_modifiers(Recipe.create_instance(GOOD))) == 1
    two = GOOD + "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: W8A8\n"
    assert structprune_modifiers(Recipe.create_instance(two, target_stage="quant_stage")) == []
    commented = "# was: StructPruneModifier\n" + GOOD.replace(
        "StructPruneModifier", "ConstantPruningModifier"
    )
    commented = commented.replace("sparsity: 0.3", "targets: ['re:.*weight']")
    assert structprune_modifiers(Recipe.create_instance(commented)) == []
    other = "stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: W8A8\n"
    assert Recipe.create_instance(other).modifiers == []
    # a recipe saved by oneshot (with the fields llm-compressor serialises) reads back
    saved = tmp_path / "recipe.yaml"
    Recipe.from_modifiers([StructPruneModifier(sparsity=0.2)]).yaml(file_path=str(saved))
    (reread,) = structprune_modifiers(Recipe.create_instance(str(saved)))
    assert reread.sparsity == 0.2


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_its_structprune_entry(path):
    assert len(structprune_modifiers(Recipe.create_instance(str(path)))) == 1


def test_oneshot_with_a_misnamed_stage_stops_before_saving_a_dense_model(tiny_trained_dir, tmp_path):
    """The reported case: `stage:` instead of `pruning_stage:` ran 0 modifiers, exited normally and
    wrote the dense model to output_dir."""
    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_trained_dir)
    ids = torch.randint(3, model.config.vocab_size, (4, 16))
    out = tmp_path / "out"
    with pytest.raises(StructPruneError, match="Fix: rename the key so it ends in '_stage'"):
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
            recipe=GOOD.replace("pruning_stage:", "stage:"),
            num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1],
            output_dir=str(out),
        )
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))


def test_guard_is_installed_when_llmcompressor_is_imported_first():
    """The in-process tests import the plugin first (the import hook path); this is the other order."""
    code = (
        "import llmcompressor, struprune_plugin\n"
        "from llmcompressor.recipe import Recipe\n"
        "from struprune_plugin.errors import RecipeError\n"
        f"try:\n    Recipe.create_instance({GOOD.replace('pruning_stage:', 'stage:')!r})\n"
        "except RecipeError as err:\n    print('refused:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: recipe key 'stage'" in done.stdout


# -- item B: unknown settings ------------------------------------------------------------------


def test_constructor_refuses_unknown_settings_naming_them_and_the_known_ones():
    with pytest.raises(RecipeError) as caught:
        StructPruneModifier(sparsityy=0.3)
    text = str(caught.value)
    assert "no setting 'sparsityy'" in text and "\n" not in text
    assert "sparsity, units, head_unit" in text and "temperature" in text and "report_path" in text
    assert text.endswith("Fix: rename 'sparsityy' to 'sparsity' in the recipe entry or constructor call")
    with pytest.raises(RecipeError, match="remove the key or spell it as one of the settings listed"):
        StructPruneModifier(sparsity=0.3, zzz_unrelated=1)


def test_yaml_recipe_refuses_a_misspelt_setting():
    recipe = GOOD.replace("sparsity: 0.3", "sparsity: 0.3\n      temprature: 2")
    with pytest.raises(
        RecipeError, match=r"no setting 'temprature'.*Fix: rename 'temprature' to 'temperature'"
    ):
        Recipe.create_instance(recipe)
    # llm-compressor's own fields and the ones its saved recipes carry stay accepted
    fields = "sparsity: 0.3\n      start: 0\n      requires_calibration_data: true"
    (modifier,) = structprune_modifiers(Recipe.create_instance(GOOD.replace("sparsity: 0.3", fields)))
    assert modifier.group == "pruning" and modifier.start == 0


def test_unknown_settings_stay_refused_without_the_hosts_config():
    """The modifier pins `extra="forbid"` itself, so a base class that relaxed it could not let a typo
    through on the pydantic path that skips __init__ (model_validate)."""
    assert StructPruneModifier.model_config.get("extra") == "forbid"
    with pytest.raises(ValueError, match="temprature"):
        StructPruneModifier.model_validate({"temprature": 2})
