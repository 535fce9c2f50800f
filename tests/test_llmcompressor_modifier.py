"""StructPruneModifier inside llm-compressor's `oneshot`: recipes (YAML and Python), validation,
the saved folder, and equality with the plugin's own layer-by-layer run on the same data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
llmcompressor = pytest.importorskip("llmcompressor")

from llmcompressor import oneshot  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import struprune_plugin  # noqa: E402,F401  (registers the modifier)
from conftest import logits  # noqa: E402
from struprune_plugin import PruneConfig, load_pruned, prune_model  # noqa: E402
from struprune_plugin.architectures import model_view  # noqa: E402
from struprune_plugin.llmcompressor_modifier import StructPruneModifier  # noqa: E402

SAMPLES, LENGTH = 8, 32


@pytest.fixture
def tiny(tiny_trained_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_trained_dir)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (SAMPLES, LENGTH))
    return model, tokenizer, ids


def run_oneshot(model, tokenizer, ids, recipe, **kwargs):
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    return oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,  # the engine sees the samples in order too
        **kwargs,
    )


def widths(model):
    return [(lv.num_heads, lv.num_kv_heads, lv.intermediate_size) for lv in model_view(model).layer_views()]


def assert_same_pruning(a, b, atol=1e-4):
    """Same kept groups (shapes follow from the masks; weights then agree up to summation order)."""
    assert widths(a) == widths(b)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=1e-3, msg=name)


YAML = """
structprune_stage:
  pruning_modifiers:
    StructPruneModifier:
      sparsity: 0.4
      admm_iterations: 2
"""


def test_yaml_recipe_equals_the_plugins_own_run_and_saves_a_reloadable_folder(tiny, tmp_path):
    model, tokenizer, ids = tiny
    reference = prune_model(
        copy.deepcopy(model), ids, PruneConfig(sparsity=0.4, admm_iterations=2, batch_size=1), progress=False
    )
    dense_widths = widths(model)
    pruned = run_oneshot(model, tokenizer, ids, YAML, output_dir=str(tmp_path / "out"))
    assert widths(pruned) != dense_widths
    assert_same_pruning(pruned, reference.model)
    x = torch.randint(3, model.config.vocab_size, (2, 17))
    torch.testing.assert_close(logits(pruned, x), logits(reference.model, x), atol=5e-4, rtol=1e-3)
    # the saved folder describes its own weights and reloads to the in-memory model
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["struprune_layout"]["intermediate_sizes"] == [w[2] for w in widths(pruned)]
    reloaded = load_pruned(tmp_path / "out")
    assert widths(reloaded) == widths(pruned)
    assert torch.equal(logits(reloaded, x), logits(pruned, x))
    assert "StructPruneModifier" in (tmp_path / "out" / "recipe.yaml").read_text()


@pytest.mark.parametrize(
    "rule",
    [
        dict(temperature=1.0, energy="wanda"),
        dict(allocation="kl-knapsack", sensitivity_samples=2, allocation_options={"max_deviation": 0.2}),
    ],
    ids=["energy-softmax", "kl-knapsack"],
)
def test_python_recipe_with_a_per_layer_allocation_matches_the_engine(tiny, rule):
    model, tokenizer, ids = tiny
    settings = dict(sparsity=0.35, admm_iterations=1, energy_samples=4, **rule)
    reference = prune_model(copy.deepcopy(model), ids, PruneConfig(**settings, batch_size=1), progress=False)
    pruned = run_oneshot(model, tokenizer, ids, [StructPruneModifier(**settings)])
    assert len({w[2] for w in widths(pruned)}) > 1, "a per-layer allocation should give unequal widths"
    assert_same_pruning(pruned, reference.model)


def test_energy_split_matches_the_engine(tiny):
    model, tokenizer, ids = tiny
    settings = dict(sparsity=0.45, kind_split="energy", admm_iterations=1)
    reference = prune_model(copy.deepcopy(model), ids, PruneConfig(**settings, batch_size=1), progress=False)
    ratio = prune_model(copy.deepcopy(model), ids, PruneConfig(sparsity=0.45, batch_size=1), progress=False)
    assert widths(reference.model) != widths(ratio.model), "the split should move budget between kinds"
    pruned = run_oneshot(model, tokenizer, ids, [StructPruneModifier(**settings)])
    assert_same_pruning(pruned, reference.model)


def test_ignored_layers_stay_dense_and_mlp_only_keeps_heads(tiny):
    model, tokenizer, ids = tiny
    dense = copy.deepcopy(model)
    modifier = StructPruneModifier(sparsity=0.3, units=["mlp"], ignore=["re:.*layers\\.0$", "model.layers.3"])
    pruned = run_oneshot(model, tokenizer, ids, [modifier])
    before, after = widths(dense), widths(pruned)
    assert after[0] == before[0] and after[3] == before[3]
    assert all(a[:2] == b[:2] for a, b in zip(after, before))  # every head kept
    assert after[1][2] < before[1][2] and after[2][2] < before[2][2]
    for i in (0, 3):
        original = model_view(dense).layers[i].state_dict()
        assert all(torch.equal(v, model_view(pruned).layers[i].state_dict()[k]) for k, v in original.items())


def test_unknown_and_invalid_recipe_keys_fail_validation():
    from llmcompressor.recipe import Recipe

    from struprune_plugin.errors import RecipeError

    with pytest.raises(RecipeError, match=r"no setting 'sparsty'.*Fix: rename 'sparsty' to 'sparsity'"):
        Recipe.create_instance(YAML.replace("sparsity", "sparsty"))
    with pytest.raises(ValidationError, match="sparsity must be in"):
        StructPruneModifier(sparsity=1.5)
    with pytest.raises(ValidationError, match="temperature must be > 0"):
        StructPruneModifier(temperature=0)
    with pytest.raises(ValidationError):
        StructPruneModifier(units=["experts"])


def test_modifier_solver_settings_default_to_the_engines_and_pass_through():
    """The ridge and token settings of a bare modifier are PruneConfig's; set ones reach the engine."""

    def solver(config):
        return config.damping, config.ridge_scale, config.solver_tokens

    assert solver(StructPruneModifier(sparsity=0.3).prune_config()) == solver(PruneConfig())
    set_ = StructPruneModifier(sparsity=0.3, damping=0.001, ridge_scale="channel", solver_tokens=4096)
    assert solver(set_.prune_config()) == (0.001, "channel", 4096)
    with pytest.raises(ValidationError, match="ridge_scale"):
        StructPruneModifier(sparsity=0.3, ridge_scale="diag")


def test_ignore_patterns_that_match_nothing_are_an_error(tiny):
    from struprune_plugin.errors import StructPruneError

    model, tokenizer, ids = tiny
    with pytest.raises(StructPruneError, match="match no decoder layer"):
        run_oneshot(model, tokenizer, ids, [StructPruneModifier(ignore=["model.layers.9"])])


def test_structprune_then_quantization_recipe_runs_end_to_end(tiny, tmp_path):
    model, tokenizer, ids = tiny
    recipe = """
structprune_stage:
  pruning_modifiers:
    StructPruneModifier:
      sparsity: 0.3
      admm_iterations: 1
      equal_widths: true
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: [Linear]
      scheme: W8A8
      ignore: [lm_head]
"""
    dense_widths = widths(model)
    pruned = run_oneshot(model, tokenizer, ids, recipe, output_dir=str(tmp_path / "q"))
    assert widths(pruned) != dense_widths
    down = model_view(pruned).layer(0).mlp_out
    assert hasattr(down, "weight_scale"), "GPTQ did not quantize the pruned down_proj"
    assert down.weight_scale.shape[0] == down.weight.shape[0]
    x = torch.randint(3, model.config.vocab_size, (1, 12))
    assert torch.isfinite(logits(pruned, x)).all()
    assert_stock_quantized_folder(tmp_path / "q", pruned, "int-quantized")


def assert_stock_quantized_folder(folder: Path, pruned, fmt: str) -> None:
    """A recipe's output_dir with equal widths is a stock compressed-tensors checkpoint (what `vllm
    serve` reads): the base model type, no remote code, and stock transformers rebuilds the same
    function from it."""
    from transformers import LlamaForCausalLM

    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" not in saved
    assert saved["quantization_config"]["format"] == fmt
    assert saved["intermediate_size"] == widths(pruned)[0][2] < 384
    assert not list(folder.glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(reloaded) is LlamaForCausalLM
    x = torch.randint(3, pruned.config.vocab_size, (1, 12))
    torch.testing.assert_close(logits(reloaded, x), logits(pruned, x), atol=1e-5, rtol=1e-5)


W4A16 = """
structprune_stage:
  pruning_modifiers:
    StructPruneModifier:
      sparsity: 0.3
      admm_iterations: 1
      units: [mlp]
      mlp_round_to: {round_to}
      equal_widths: true
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: [Linear]
      scheme: W4A16
      ignore: [lm_head]
"""


def test_group_quantization_needs_widths_in_whole_groups(tiny, tmp_path):
    from struprune_plugin.errors import StructPruneError

    model, tokenizer, ids = tiny
    with pytest.raises(StructPruneError, match="Fix: set mlp_round_to: 128"):
        run_oneshot(copy.deepcopy(model), tokenizer, ids, W4A16.format(round_to=1))
    pruned = run_oneshot(model, tokenizer, ids, W4A16.format(round_to=128), output_dir=str(tmp_path / "q"))
    assert all(w[2] % 128 == 0 for w in widths(pruned)) and any(w[2] < 384 for w in widths(pruned))
    assert model_view(pruned).layer(0).mlp_out.weight_scale.shape[1] == widths(pruned)[0][2] // 128
    assert_stock_quantized_folder(tmp_path / "q", pruned, "pack-quantized")


def test_group_quantization_check_counts_heads_the_energy_split_may_remove(tiny):
    """At 10 % the ratio split removes no head (0.8 of 8 rounds to none), but the energy split may
    give any layer's budget to its heads, whose o_proj input (head_dim 16) cannot keep groups of 128."""
    from struprune_plugin.errors import StructPruneError

    model, tokenizer, ids = tiny
    recipe = W4A16.replace("units: [mlp]", "kind_split: energy").replace("      equal_widths: true\n", "")
    recipe = recipe.format(round_to=128)
    recipe = recipe.replace("sparsity: 0.3", "sparsity: 0.1")
    with pytest.raises(StructPruneError, match="o_proj of decoder layer"):
        run_oneshot(model, tokenizer, ids, recipe)


RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_on_the_tiny_model(tiny, recipe):
    model, tokenizer, ids = tiny
    dense = widths(model)
    pruned = run_oneshot(model, tokenizer, ids, str(recipe))
    after = widths(pruned)
    assert after != dense
    if "mlp_only" in recipe.stem:
        assert all(a[:2] == d[:2] for a, d in zip(after, dense))
    x = torch.randint(3, model.config.vocab_size, (1, 9))
    assert torch.isfinite(logits(pruned, x)).all()


def test_modifier_and_shipped_recipes_default_to_the_engines_allocation():
    """A bare modifier, and the 20 / 30 / 50 % recipes (which spell the default out), allocate with
    the rule `PruneConfig()` gives: the relative-energy softmax at T = 1 within (1 +- 0.2) x the mean
    kept share."""
    import yaml

    from struprune_plugin.engine import make_allocator

    def rule(config):
        allocator = make_allocator(config)
        return allocator.name, allocator.temperature, allocator.max_deviation, allocator.relative_deviation

    default = rule(PruneConfig())
    assert default == ("energy-relative", 1.0, None, 0.2)
    assert rule(StructPruneModifier(sparsity=0.3).prune_config()) == default
    for n in (20, 30, 50):
        text = (Path(__file__).parent.parent / "recipes" / f"structprune_{n}.yaml").read_text()
        fields = yaml.safe_load(text)["structprune_stage"]["pruning_modifiers"]["StructPruneModifier"]
        assert rule(StructPruneModifier(**fields).prune_config()) == default, n


def test_oneshot_calibrates_on_a_local_jsonl_file(tiny, tmp_path):
    """Users' own data reaches the modifier the llm-compressor way: a local JSON-lines file loaded by
    `datasets`, tokenized by `oneshot` itself from its `text` column."""
    from struprune_plugin.data import ensure_texts

    model, tokenizer, _ = tiny
    paragraphs = [p for p in ensure_texts().read("wiki_valid").split("\n") if len(p) > 300][:SAMPLES]
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    reference = copy.deepcopy(model)
    pruned = oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=StructPruneModifier(sparsity=0.3),
        num_calibration_samples=len(paragraphs),
        max_seq_length=LENGTH,
        output_dir=str(tmp_path / "out"),
    )
    assert all(w[2] < 384 for w in widths(pruned))
    prunable = lambda m: sum(lin.weight.numel() for lv in model_view(m).layer_views() for lin in lv.linears)  # noqa: E731
    assert 1 - prunable(pruned) / prunable(reference) == pytest.approx(0.3, abs=0.01)
    ids = torch.randint(3, 4096, (1, 12))
    assert torch.equal(logits(load_pruned(tmp_path / "out"), ids), logits(pruned, ids))


def test_modifier_on_gemma3_equals_the_engine(tiny, tmp_path):
    """Gemma 3 interleaves sliding-window and global layers: llm-compressor's pipeline hands each
    layer its own mask, the engine its kind's; both must prune alike."""
    from conftest import VOCAB, make_model

    _, tokenizer, _ = tiny
    make_model("gemma3", layers=3, seed=4).save_pretrained(tmp_path / "dense")  # oneshot wants a name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (SAMPLES, LENGTH))  # 32 tokens: wider than the 8-token window
    settings = dict(sparsity=0.4, admm_iterations=1, kind_split="energy")
    reference = prune_model(copy.deepcopy(model), ids, PruneConfig(**settings, batch_size=1), progress=False)
    pruned = run_oneshot(model, tokenizer, ids, [StructPruneModifier(**settings)])
    assert widths(pruned) != widths(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"))
    assert_same_pruning(pruned, reference.model)


def test_modifier_refuses_layers_called_without_a_causal_mask(tiny, tmp_path):
    """llm-compressor 0.14 calibrates Phi-3 under eager attention with no mask (non-causal): the
    modifier refuses instead of fitting that computation."""
    from conftest import VOCAB, make_model

    _, tokenizer, _ = tiny
    make_model("phi3", layers=2, seed=4).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (SAMPLES, LENGTH))
    with pytest.raises(Exception, match="without an attention mask, so it would attend to future tokens"):
        run_oneshot(model, tokenizer, ids, [StructPruneModifier(sparsity=0.3)])
