"""Layer-wise healing against independent checks: every layer's output error against the dense
layer (recomputed here, outside the healer) falls, the healed model's held-out perplexity falls,
the widths and the teacher stay as they were, and bad teachers and budgets are refused."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from conftest import TINY_TRAINED, VOCAB, make_model
from struprune_plugin.architectures import model_view
from struprune_plugin.engine import PruneConfig, capture_layer_inputs, layer_forward, prune_model
from struprune_plugin.healing import LayerwiseHealConfig, heal_layerwise
from struprune_plugin.healing.layerwise import HealConfigError


def _layer_errors(student, teacher, ids, own_prefix: bool) -> list[float]:
    """Each student layer's relative output error against the teacher layer's. `own_prefix`: the
    student layer is fed the student's own earlier layers (the error the model carries forward);
    otherwise the dense prefix's hidden states (the layer's error alone)."""
    s_view, t_view = model_view(student), model_view(teacher)
    errors = []
    with torch.no_grad():
        (s_in,) = capture_layer_inputs(student, s_view, [ids], torch.device("cpu"))
        (t_in,) = capture_layer_inputs(teacher, t_view, [ids], torch.device("cpu"))
        mine, dense = s_in.hidden, t_in.hidden
        for s_layer, t_layer in zip(s_view.layers, t_view.layers):
            want = layer_forward(t_layer, replace(s_in, hidden=dense))
            got = layer_forward(s_layer, replace(s_in, hidden=mine if own_prefix else dense))
            errors.append(((got - want).pow(2).sum() / want.pow(2).sum()).item())
            mine, dense = got, want
    return errors


def _nll(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.fixture(scope="module")
def tiny_pruned():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize

    teacher = AutoModelForCausalLM.from_pretrained(TINY_TRAINED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(TINY_TRAINED)
    corpus = ensure_texts()
    calib = sample_calibration(tokenize(tok, corpus.read("wiki_train")), 8, 128, seed=0)
    held_out = tokenize(tok, corpus.read("wiki_valid"))[: 128 * 8].view(8, 128)
    pruned = prune_model(teacher, calib, PruneConfig(sparsity=0.5, admm_iterations=1), progress=False).model
    return teacher, pruned, calib, held_out


@pytest.mark.parametrize("inputs", ["healed", pytest.param("dense", marks=pytest.mark.slow)])
def test_healing_lowers_every_layers_error_and_the_held_out_loss(tiny_pruned, inputs):
    teacher, pruned, calib, held_out = tiny_pruned
    student = copy.deepcopy(pruned)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    records = heal_layerwise(
        student,
        teacher,
        calib,
        LayerwiseHealConfig(steps=24, lr=3e-4, batch_size=4, inputs=inputs),
        progress=False,
    )
    assert [r.index for r in records] == list(range(len(model_view(student).layers)))
    assert all(r.error_after < r.error_before for r in records), [
        (r.error_before, r.error_after) for r in records
    ]
    # independent, on held-out text: trained on its own prefix, every layer's carried-forward error
    # falls; trained on the dense prefix, every layer's own error falls
    own = inputs == "healed"
    before, after = (
        _layer_errors(pruned, teacher, held_out, own),
        _layer_errors(student, teacher, held_out, own),
    )
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert _nll(student, held_out) < _nll(pruned, held_out)  # and the model predicts text better
    assert {k: v.shape for k, v in student.state_dict().items()} == shapes  # same widths
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # teacher read only


def test_a_teacher_that_is_not_the_dense_source_is_refused():
    student = make_model("llama", layers=2)
    with pytest.raises(HealConfigError, match="num_hidden_layers"):
        heal_layerwise(
            student, make_model("llama", layers=3), torch.randint(0, VOCAB, (2, 8)), progress=False
        )
    with pytest.raises(HealConfigError, match="teacher is a"):
        heal_layerwise(
            student, make_model("qwen2", layers=2), torch.randint(0, VOCAB, (2, 8)), progress=False
        )


def test_bad_settings_and_an_empty_budget_are_refused():
    for bad in (
        dict(steps=0),
        dict(lr=0.0),
        dict(lr=float("nan")),
        dict(batch_size=0),
        dict(inputs="prefix"),
    ):
        with pytest.raises(HealConfigError):
            LayerwiseHealConfig(**bad)
    model = make_model("llama", layers=2)
    with pytest.raises(HealConfigError, match="at least one token"):
        heal_layerwise(model, copy.deepcopy(model), torch.zeros(0, 8, dtype=torch.long), progress=False)


def test_an_interrupted_layerwise_run_resumes_to_the_same_model(tiny_pruned, tmp_path, monkeypatch):
    from struprune_plugin.healing import layerwise

    teacher, pruned, calib, _ = tiny_pruned
    config = LayerwiseHealConfig(steps=3, lr=1e-3, batch_size=4)
    reference = copy.deepcopy(pruned)
    heal_layerwise(reference, teacher, calib, config, progress=False)

    real_train = layerwise.train_layer
    calls = {"n": 0}

    def dies_in_layer_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(layerwise, "train_layer", dies_in_layer_2)
    with pytest.raises(KeyboardInterrupt):
        heal_layerwise(copy.deepcopy(pruned), teacher, calib, config, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(layerwise, "train_layer", real_train)
    assert sorted(p.name for p in tmp_path.glob("layer-*.json")) == ["layer-0000.json", "layer-0001.json"]
    resumed = copy.deepcopy(pruned)
    trained = []
    monkeypatch.setattr(layerwise, "train_layer", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    records = heal_layerwise(resumed, teacher, calib, config, progress=False, checkpoint_dir=tmp_path)
    assert len(trained) == len(records) - 2  # the two saved layers were loaded, not trained again
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)
    with pytest.raises(HealConfigError, match="other settings"):
        heal_layerwise(
            copy.deepcopy(pruned),
            teacher,
            calib,
            replace(config, lr=2e-3),
            progress=False,
            checkpoint_dir=tmp_path,
        )
