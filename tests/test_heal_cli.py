"""`struprune heal` end to end on the tiny trained model: the healed folder keeps the pruned
widths and loaders, its layers are closer to the dense ones, the report and plot are written, and
bad input (a teacher that is not the dense source, no tokens, an output inside an input) exits 2
without writing anything."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_TRAINED, make_model, run_cli, tree_digest
from struprune_plugin.checkpoint import load_pruned


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """One pruned tiny folder for the module (the tests only read it, and check they did)."""
    tmp = tmp_path_factory.mktemp("heal")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STRUPRUNE_CACHE", str(tmp / "cache"))
        out = tmp / "pruned"
        argv = ["prune", "--model", TINY_TRAINED, "--sparsity", 0.5, "--calib-samples", 4, "--calib-len", 64]
        assert run_cli(*argv, "--admm-iterations", 1, "--no-eval", "--no-progress", "--output", out) == 0
        yield out


LAYERWISE = ["--mode", "layerwise", "--steps", 6, "--lr", 3e-4]
HEAL = [*LAYERWISE, "--tokens", 512, "--calib-len", 64, "--batch-size", 4, "--no-progress"]


def test_heal_writes_a_healed_folder_of_the_same_kind(pruned, tmp_path, monkeypatch):
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "healed"
    before = tree_digest(pruned)
    argv = ["heal", pruned, "--output", out, *HEAL, "--texts", "wiki_valid", "--eval-seq-len", 64]
    assert run_cli(*argv, "--eval-max-windows", 4) == 0
    assert tree_digest(pruned) == before  # the input is never modified
    config, healed_config = (json.loads((f / "config.json").read_text()) for f in (pruned, out))
    assert healed_config["struprune_layout"] == config["struprune_layout"]  # same widths, same loader
    report = json.loads((out / "struprune_heal.json").read_text())
    assert report["teacher"].endswith("tiny-llama-gqa")  # read from the pruned folder's report
    assert report["settings"]["tokens"] == 512 and report["calibration"]["samples"] == 8
    assert all(layer["error_after"] < layer["error_before"] for layer in report["layers"])
    assert set(report["perplexity"]["wiki_valid"]) == {"before", "after"}
    assert (out / "heal_layer_errors.png").stat().st_size > 0
    a, b = load_pruned(pruned), load_pruned(out)
    ids = torch.randint(0, a.config.vocab_size, (1, 16))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    with torch.no_grad():
        assert not torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)  # the weights moved


def test_bad_heal_input_exits_2_and_writes_nothing(pruned, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))
    before = tree_digest(pruned)
    assert run_cli("heal", pruned, "--output", pruned / "inside", *HEAL, "--no-eval") == 2
    assert "inside" in capsys.readouterr().err
    assert run_cli("heal", pruned, "--output", tmp_path / "a", "--tokens", 0, "--no-eval") == 2
    assert "--tokens" in capsys.readouterr().err
    other = tmp_path / "other"  # a dense model of another depth is not this model's source
    make_model("llama", layers=2).save_pretrained(other)
    assert run_cli("heal", pruned, "--teacher", other, "--output", tmp_path / "b", *HEAL, "--no-eval") == 2
    assert "dense model the pruned one was made from" in capsys.readouterr().err
    assert tree_digest(pruned) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


E2E = ["--tokens", 1024, "--calib-len", 64, "--batch-size", 4, "--micro-batch-size", 2, "--no-progress"]


@pytest.mark.parametrize("extra", [[], ["--lora-rank", 4]], ids=["full", "lora"])
def test_heal_distill_writes_a_healed_folder_with_its_loss_curve(pruned, tmp_path, monkeypatch, extra):
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "healed"
    before = tree_digest(pruned)
    argv = ["heal", pruned, "--mode", "distill", "--output", out, *E2E, *extra, "--lr", 1e-3]
    assert run_cli(*argv, "--texts", "wiki_valid", "--eval-seq-len", 64, "--eval-max-windows", 4) == 0
    assert tree_digest(pruned) == before
    report = json.loads((out / "struprune_heal.json").read_text())
    assert report["mode"] == ("distill-lora" if extra else "distill-full")
    assert report["training"]["steps"] == 1024 // 64 // 4 and len(report["training"]["losses"]) == 4
    assert (out / "heal_loss.png").stat().st_size > 0
    assert not (tmp_path / "healed.heal-checkpoints").exists()  # removed once the folder is written
    a, b = load_pruned(pruned), load_pruned(out)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert not any(".lora_" in k for k in b.state_dict())  # LoRA merged back


@pytest.mark.slow
def test_heal_runs_on_a_folder_llm_compressor_saved(tmp_path, monkeypatch, tiny_trained_dir):
    datasets = pytest.importorskip("datasets")
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.llmcompressor_modifier import StructPruneModifier

    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_trained_dir)
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    saved = tmp_path / "oneshot"
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
        recipe=[StructPruneModifier(sparsity=0.4, admm_iterations=1)],
        num_calibration_samples=4,
        max_seq_length=32,
        output_dir=str(saved),
    )
    # no struprune report in a host's folder: the teacher must be named
    assert run_cli("heal", saved, "--output", tmp_path / "x", *E2E, "--no-eval") == 2
    out = tmp_path / "healed"
    argv = ["heal", saved, "--teacher", tiny_trained_dir, "--mode", "finetune", "--output", out, *E2E]
    assert run_cli(*argv, "--no-eval") == 0
    assert (
        json.loads((out / "config.json").read_text())["struprune_layout"]
        == json.loads((saved / "config.json").read_text())["struprune_layout"]
    )
    load_pruned(out)


def test_a_teacher_with_another_tokenizer_is_refused(pruned, tmp_path, capsys, tiny_trained_dir):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_trained_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(data))
    assert run_cli("heal", pruned, "--teacher", other, "--output", tmp_path / "h", *E2E, "--no-eval") == 2
    assert "tokenizer" in capsys.readouterr().err
