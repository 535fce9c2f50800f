"""The `struprune` command line on the committed tiny trained model, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import folder_tensors
from struprune_plugin.checkpoint import load_pruned
from struprune_plugin.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _run(*argv):
    return main([str(a) for a in argv])


def test_prune_eval_report(cache, tiny_trained_dir, capsys):
    out = cache / "pruned"
    args = [
        "prune",
        "--model",
        tiny_trained_dir,
        "--method",
        "wanda-sp",
        "--sparsity",
        0.3,
        "--calib-samples",
        8,
        "--calib-len",
        128,
        "--eval-seq-len",
        128,
        "--eval-max-windows",
        6,
        "--output",
        out,
        "--no-progress",
    ]
    assert _run(*args) == 0
    printed = capsys.readouterr().out
    assert "| Wikipedia subset (test) |" in printed and "| news |" in printed
    report = json.loads((out / "struprune_report.json").read_text())
    assert abs(report["pruning"]["achieved_sparsity"] - 0.3) < 0.01
    ppl = report["perplexity"]["wiki_test"]
    assert ppl["dense"]["ppl"] < ppl["pruned"]["ppl"] < 10 * ppl["dense"]["ppl"]
    # the tiny model's tokenizer adds no BOS: none on calibration or evaluation windows, and said so
    assert report["calibration"]["bos"] is False and ppl["pruned"]["bos"] is False
    assert (out / "layer_widths.png").stat().st_size > 1000
    assert (out / "struprune_report.md").exists()
    # the saved model is the one that was evaluated
    assert (
        _run(
            "eval",
            out,
            "--texts",
            "wiki_test",
            "--eval-seq-len",
            128,
            "--eval-max-windows",
            6,
            "--no-progress",
            "--output",
            cache / "eval.json",
        )
        == 0
    )
    again = json.loads((cache / "eval.json").read_text())["perplexity"]["wiki_test"]["ppl"]
    assert again == pytest.approx(ppl["pruned"]["ppl"], rel=1e-5)
    # refusing to overwrite without --overwrite, with a clear message
    assert _run(*args) == 2
    assert "--overwrite" in capsys.readouterr().err
    # the source model folder is untouched and still loads as before
    model = load_pruned(tiny_trained_dir)
    assert model.model.layers[0].mlp.gate_proj.out_features == 384


def test_magnitude_needs_no_calibration(cache, tiny_trained_dir):
    out = cache / "mag"
    assert (
        _run(
            "prune",
            "--model",
            tiny_trained_dir,
            "--method",
            "magnitude",
            "--sparsity",
            0.5,
            "--units",
            "mlp",
            "--no-eval",
            "--output",
            out,
            "--no-progress",
        )
        == 0
    )
    report = json.loads((out / "struprune_report.json").read_text())
    assert "calibration" not in report
    assert all(layer["heads"][0] == layer["heads"][1] for layer in report["layers"])
    model = load_pruned(out)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sparsity", "1.2"], "must be in [0, 1)"),
        (["--method", "wanda-sp", "--head-sparsity", "0.3"], "Feasible ratios"),
        (["--head-sparsity", "0.5"], "only the uniform methods"),
        (["--calib-len", "10000000"], "shorter than one window"),
    ],
)
def test_bad_arguments_exit_2(cache, tiny_trained_dir, capsys, argv, message):
    code = _run(
        "prune",
        "--model",
        tiny_trained_dir,
        "--no-eval",
        "--calib-samples",
        2,
        "--output",
        cache / "x",
        "--no-progress",
        *argv,
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_name(cache, capsys):
    assert _run("eval", "no-such-model") == 2
    assert "no hub downloads" in capsys.readouterr().err
    assert _run("prepare", "--model", "no-such-model") == 2
    assert "gemma3-270m" in capsys.readouterr().err  # the error lists the models it knows


def test_prepare_builds_the_texts_and_names_the_model(cache, tiny_trained_dir, capsys):
    assert _run("prepare", "--model", "tiny") == 0
    printed = capsys.readouterr().out
    assert f"model: {tiny_trained_dir}" in printed and str(cache / "cache") in printed


def test_structprune_method_records_energies(cache, tiny_trained_dir):
    out = cache / "sp"
    assert (
        _run(
            "prune",
            "--model",
            tiny_trained_dir,
            "--method",
            "structprune",
            "--sparsity",
            0.4,
            "--temperature",
            0.5,
            "--admm-iterations",
            1,
            "--calib-samples",
            4,
            "--calib-len",
            64,
            "--no-eval",
            "--output",
            out,
            "--no-progress",
        )
        == 0
    )
    report = json.loads((out / "struprune_report.json").read_text())
    assert report["pruning"]["settings"]["temperature"] == 0.5
    assert report["pruning"]["settings"]["mlp_round_to"] == 8  # the rounding that ran, not "auto"
    assert len(report["pruning"]["layer_energies"]["mlp"]) == 4
    assert abs(report["pruning"]["achieved_sparsity"] - 0.4) < 0.01
    assert load_pruned(out)(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_allocation_rule_and_its_measurements_reach_the_report(cache, tiny_trained_dir):
    out = cache / "kl"
    args = ["prune", "--model", tiny_trained_dir, "--sparsity", 0.3, "--allocation", "kl-knapsack"]
    args += [
        "--allocation-option",
        "max_deviation=0.25",
        "--sensitivity-samples",
        2,
        "--admm-iterations",
        0,
        "--calib-samples",
        4,
        "--calib-len",
        32,
    ]
    assert _run(*args, "--no-eval", "--output", out, "--no-progress") == 0
    report = json.loads((out / "struprune_report.json").read_text())
    allocation = report["pruning"]["allocation"]
    assert allocation["allocation"] == "kl-knapsack"
    assert allocation["max_deviation"] == 0.25
    assert allocation["sensitivity"]["tokens"] == 2 * 32
    assert len(allocation["sensitivity"]["kl"]) == len(report["layers"])
    removed = [layer["removed_params"] for layer in report["layers"]]
    assert len(set(removed)) > 1  # measured curves differ: the widths do too
    assert "allocation `kl-knapsack`" in (out / "struprune_report.md").read_text()


def test_a_bad_allocation_option_names_the_rules_settings(cache, tiny_trained_dir, capsys):
    args = ["prune", "--model", tiny_trained_dir, "--allocation", "owl", "--allocation-option", "radius=1"]
    assert _run(*args, "--no-eval", "--output", cache / "bad-option", "--no-progress") != 0
    err = capsys.readouterr().err
    assert "no setting 'radius'" in err and "lam" in err


@pytest.mark.parametrize("dtype", ["auto", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_stream_weights_gives_the_in_memory_result(cache, tiny_trained_dir, dtype):
    """`--stream-weights` (one layer in memory) and the in-memory run write the same tensors and
    report the same perplexities; the streamed folder lists its report in the manifest."""
    common = ["prune", "--model", tiny_trained_dir, "--sparsity", 0.3, "--calib-samples", 8]
    common += ["--calib-len", 64, "--eval-seq-len", 64, "--eval-max-windows", 3, "--no-progress"]
    common += ["--dtype", dtype]
    assert _run(*common, "--output", cache / "mem") == 0
    assert _run(*common, "--stream-weights", "--output", cache / "disk") == 0

    a, b = folder_tensors(cache / "mem"), folder_tensors(cache / "disk")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    if dtype == "bfloat16":
        assert {t.dtype for t in b.values()} == {torch.bfloat16}
    ra, rb = (json.loads((cache / f / "struprune_report.json").read_text()) for f in ("mem", "disk"))
    assert ra["perplexity"] == rb["perplexity"]
    assert rb["pruning"]["weights"] == "streamed from disk" and rb["pruning"]["dtype"] == (
        "bfloat16" if dtype == "bfloat16" else "float32"
    )
    manifest = json.loads((cache / "disk" / "struprune_manifest.json").read_text())["files"]
    assert "struprune_report.json" in manifest and "model.safetensors.index.json" in manifest
