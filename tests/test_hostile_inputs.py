"""Bad input as a hostile or careless user brings it: nothing is lost, nothing runs unasked, no
result is silently wrong, and every refusal is one line naming the problem and the fix.

Everything runs on the committed tiny model with tiny calibration, so the whole file takes seconds.
The ONNX export's remote-code cases live in test_onnx_export.py (they need the export environment).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VOCAB, logits, make_model, one_line_error, run_cli, tree_digest
from struprune_plugin.checkpoint import load_pruned, save_pruned
from struprune_plugin.cli import main
from struprune_plugin.engine import PruneConfig, missed_budget, prune_model
from struprune_plugin.errors import (
    CalibrationDataError,
    CheckpointError,
    LayoutMismatchError,
    NonFiniteWeightError,
    OutputPathError,
    StructPruneError,
)
from struprune_plugin.evaluation import perplexity

QUICK = ["--calib-samples", "4", "--calib-len", "64", "--no-progress"]
QUICK_EVAL = ["--texts", "wiki_test", "--eval-seq-len", "64", "--eval-max-windows", "2"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_copy(tmp_path, tiny_trained_dir) -> Path:
    """A writable copy of the tiny model inside a folder the user also keeps other files in."""
    home = tmp_path / "X"
    shutil.copytree(tiny_trained_dir, home / "model")
    (home / "notes.txt").write_text("my notes")
    return home / "model"


# -- 1. data loss -------------------------------------------------------------------------------


def test_overwrite_never_deletes_the_folder_holding_the_input(model_copy, capsys):
    home = model_copy.parent
    before = tree_digest(home)
    assert run_cli("prune", "--model", model_copy, "--output", home, "--overwrite", "--no-eval", *QUICK) == 2
    one_line_error(capsys, "contains the input model folder")
    assert tree_digest(home) == before


def test_output_inside_the_input_is_refused(model_copy, capsys):
    before = tree_digest(model_copy)
    out = model_copy / "pruned"
    assert run_cli("prune", "--model", model_copy, "--output", out, "--no-eval", *QUICK) == 2
    one_line_error(capsys, "lies inside the input model folder")
    assert tree_digest(model_copy) == before and not out.exists()


def test_overwrite_replaces_only_a_previous_struprune_output(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 not a model")
    args = ["prune", "--model", "tiny", "--method", "magnitude", "--sparsity", "0.2", "--no-eval", *QUICK]
    assert run_cli(*args, "--output", foreign, "--overwrite") == 2
    one_line_error(capsys, "holds other content (holiday.jpg)")
    assert (foreign / "holiday.jpg").read_bytes() == b"\xff\xd8 not a model"

    out = tmp_path / "pruned"
    assert run_cli(*args, "--output", out) == 0
    assert run_cli(*args, "--output", out, "--overwrite") == 0  # its own previous output: replaced
    assert json.loads((out / "struprune_manifest.json").read_text())["files"]
    (out / "my-eval.json").write_text("{}")  # a file of the user's in it
    capsys.readouterr()
    assert run_cli(*args, "--output", out, "--overwrite") == 2
    one_line_error(capsys, "my-eval.json")
    assert (out / "my-eval.json").exists()


@pytest.mark.parametrize("where", ["cwd", "file-parent", "unwritable"])
def test_bad_output_paths_fail_before_any_work(where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    output = {"cwd": ".", "file-parent": "a-file/out", "unwritable": "/proc/struprune-out"}[where]
    # --calib-len 100000 would fail only once the model is loaded: the output check comes first
    assert (
        run_cli("prune", "--model", "tiny", "--output", output, "--overwrite", "--calib-len", "100000") == 2
    )
    one_line_error(capsys, "output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_read_only_output_parent_fails_before_any_work(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the /proc case above covers unwritable paths")
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    assert run_cli("prune", "--model", "tiny", "--output", parent / "out", "--no-eval", *QUICK) == 2
    one_line_error(capsys, "cannot be written")


def test_unwritable_eval_output_and_modifier_report_fail_before_any_work(tmp_path, capsys):
    assert run_cli("eval", "tiny", "--output", "/proc/struprune/eval.json", *QUICK_EVAL) == 2
    one_line_error(capsys, "--output")
    pytest.importorskip("llmcompressor")
    from llmcompressor.core import State

    from struprune_plugin.llmcompressor_modifier import StructPruneModifier

    modifier = StructPruneModifier(sparsity=0.3, report_path="/proc/struprune/report.json")
    with pytest.raises(OutputPathError, match="report_path"):
        modifier.on_initialize(State(model=make_model("llama")))


# -- 3. stale figures ---------------------------------------------------------------------------


def test_dense_perplexity_cache_follows_the_weights_content(model_copy, tmp_path):
    """Weights replaced by others of the same size and modification time (what a copy with -p
    gives) must not reuse the cached dense perplexity; it must equal a fresh computation."""
    args = ["prune", "--model", model_copy, "--method", "magnitude", "--sparsity", "0.2", *QUICK, *QUICK_EVAL]
    assert run_cli(*args, "--output", tmp_path / "a") == 0
    first = json.loads((tmp_path / "a" / "struprune_report.json").read_text())["perplexity"]["wiki_test"]

    weights = model_copy / "model.safetensors"
    stat = weights.stat()
    state = load_file(weights)
    gen = torch.Generator().manual_seed(1)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == stat.st_size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert run_cli(*args, "--output", tmp_path / "b") == 0
    second = json.loads((tmp_path / "b" / "struprune_report.json").read_text())["perplexity"]["wiki_test"]
    from transformers import AutoTokenizer

    from struprune_plugin.data import ensure_texts, tokenize

    ids = tokenize(AutoTokenizer.from_pretrained(model_copy), ensure_texts().read("wiki_test"))
    fresh = perplexity(load_pruned(model_copy), ids, seq_len=64, max_windows=2, progress=False).ppl
    assert second["dense"]["ppl"] == pytest.approx(fresh, rel=1e-5)
    assert second["dense"]["ppl"] != pytest.approx(first["dense"]["ppl"], rel=1e-3)


def test_pickled_weights_are_never_loaded(tmp_path, tiny_trained_dir, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_trained_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"only as pickles \(pytorch_model.bin\)"):
        load_pruned(folder)
    assert run_cli("eval", folder, *QUICK_EVAL) == 2
    one_line_error(capsys, "pickles")


# -- 4. a config that contradicts its layout -----------------------------------------------------


@pytest.mark.parametrize("equal_widths", [False, True])
def test_config_contradicting_the_layout_is_refused(tmp_path, equal_widths):
    from transformers import AutoModelForCausalLM

    import struprune_plugin  # noqa: F401  (registers the struprune_* classes)

    result = prune_model(
        make_model("llama", layers=3),
        torch.randint(0, VOCAB, (4, 16)),
        PruneConfig(method="wanda-sp", sparsity=0.3, equal_widths=equal_widths),
        progress=False,
    )
    out = save_pruned(result.model, tmp_path / "pruned")
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(logits(load_pruned(out), ids), logits(result.model, ids))  # unedited: exact
    config = json.loads((out / "config.json").read_text())
    config["head_dim"] = config["struprune_layout"]["head_dim"] * 2
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutMismatchError, match=r"head_dim 16 .* records 8"):
        load_pruned(out)
    with pytest.raises((ValueError, RuntimeError)):  # ours (per-layer classes) or transformers' own
        AutoModelForCausalLM.from_pretrained(out)
    config["head_dim"] //= 2
    config["struprune_layout"]["intermediate_sizes"].pop()
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutMismatchError, match=r"3 decoder layers .* 2 entries in intermediate_sizes"):
        load_pruned(out)


# -- 5. unreadable folders ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_weights_are_named_with_a_fix(damage, tmp_path, tiny_trained_dir, capsys):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_trained_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(4096)}[damage]
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors .* not a readable safetensors file"):
        load_pruned(folder)
    assert run_cli("eval", folder, *QUICK_EVAL) == 2
    one_line_error(capsys, str(weights))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("no-tokenizer", "no tokenizer files"),
        ("bad-json", "is not valid JSON"),
        ("unknown-type", "model_type 'gpt_foo'"),
        ("no-weights", "has no weights"),
    ],
)
def test_unreadable_folders_give_one_line(damage, needle, tmp_path, tiny_trained_dir, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_trained_dir, folder)
    config = folder / "config.json"
    if damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif damage == "bad-json":
        config.write_text(config.read_text()[:-20])
    elif damage == "unknown-type":
        config.write_text(config.read_text().replace('"llama"', '"gpt_foo"'))
    else:
        (folder / "model.safetensors").unlink()
    assert run_cli("eval", folder, *QUICK_EVAL) == 2
    line = one_line_error(capsys, needle)
    assert "sentencepiece" not in line


# -- 6. evaluation input the model cannot take ---------------------------------------------------


def test_tokenizer_beyond_the_vocabulary_is_refused(tmp_path, tiny_trained_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_trained_dir)
    model.resize_token_embeddings(1000)  # the folder's tokenizer still has 4096 ids
    folder = tmp_path / "small-vocab"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_trained_dir).save_pretrained(folder)
    assert run_cli("eval", folder, *QUICK_EVAL) == 2
    one_line_error(capsys, "embedding has 1000 rows", "model's own tokenizer")


def test_windows_beyond_the_models_positions_are_refused(tmp_path, capsys):
    # the tiny model has 512 positions
    assert run_cli("eval", "tiny", "--eval-seq-len", "600", "--texts", "wiki_test") == 2
    one_line_error(capsys, "exceed the model's 512 positions", "--eval-seq-len 512")
    assert (
        run_cli("prune", "--model", "tiny", "--calib-len", "600", "--no-eval", "--output", tmp_path / "x")
        == 2
    )
    one_line_error(capsys, "exceed the model's 512 positions", "--calib-len 512")
    opt = make_model("opt")  # learned positions: the old failure was a crash inside torch.embedding
    with pytest.raises(CalibrationDataError, match="positions"):
        perplexity(opt, torch.randint(0, VOCAB, (400,)), seq_len=200, progress=False)


# -- 7. devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "foo"])
def test_unusable_devices_are_named(device, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert (
        run_cli("prune", "--model", "tiny", "--device", device, "--no-eval", "--output", tmp_path / "x") == 2
    )
    one_line_error(capsys, repr(device))
    assert run_cli("eval", "tiny", "--device", device) == 2
    one_line_error(capsys, repr(device))


# -- 8. SIGTERM during the save -----------------------------------------------------------------

_SAVE_AND_GET_KILLED = """
import os, signal, sys, time
from struprune_plugin import load_pruned, save_pruned
model = load_pruned(sys.argv[1])
def extras(tmp):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the model sits in the temporary folder
    time.sleep(30)
save_pruned(model, sys.argv[2], write_extras=extras)
"""


def test_sigterm_during_the_save_leaves_no_temporary_folder(tmp_path, tiny_trained_dir):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", _SAVE_AND_GET_KILLED, str(tiny_trained_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"  # a concurrent writer's: left alone
    live.mkdir()
    save_pruned(make_model("llama"), tmp_path / "out")
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "config.json").exists()


# -- the weak ones ------------------------------------------------------------------------------


def test_unreachable_sparsity_is_refused_before_work_or_accepted_explicitly(tmp_path, capsys):
    base = ["prune", "--model", "tiny", "--method", "magnitude", "--no-eval", *QUICK]
    assert run_cli(*base, "--units", "heads", "--sparsity", "0.3", "--output", tmp_path / "a") == 2
    one_line_error(capsys, "out of reach", "--allow-shortfall")
    assert not (tmp_path / "a").exists()
    assert run_cli(*base, "--sparsity", "0.999", "--output", tmp_path / "a") == 2
    one_line_error(capsys, "out of reach")
    out = tmp_path / "b"
    assert run_cli(*base, "--units", "heads", "--sparsity", "0.3", "--allow-shortfall", "--output", out) == 0
    pruning = json.loads((out / "struprune_report.json").read_text())["pruning"]
    assert pruning["achieved_sparsity"] < 0.2 and "misses the requested 0.3000" in pruning["budget_missed"]
    assert "warning: achieved sparsity" in capsys.readouterr().err


def test_missed_budget_uses_the_rounding_tolerance():
    assert missed_budget(0.3, 0.298, 0.005) is None
    assert "misses the requested 0.3000 by 0.0200" in missed_budget(0.3, 0.28, 0.005)
    assert missed_budget(0.3, 0.32, 0.005)  # overshooting is reported too


def test_nan_weights_are_refused_even_without_calibration(tmp_path, capsys):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"model.layers.1.mlp.up_proj.weight holds 1 NaN"):
        prune_model(model, None, PruneConfig(method="magnitude"), progress=False)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["prune", "--admm-iterations", "-1"], "--admm-iterations"),
        (["prune", "--calib-samples", "0"], "--calib-samples"),
        (["prune", "--batch-size", "0"], "--batch-size"),
        (["prune", "--energy-samples", "-2"], "--energy-samples"),
        (["prune", "--mlp-round-to", "0"], "--mlp-round-to"),
        (["eval", "tiny", "--eval-max-windows", "0"], "--eval-max-windows"),
        (["eval", "tiny", "--eval-max-windows", "-1"], "--eval-max-windows"),
        (["eval", "tiny", "--eval-stride", "0"], "--eval-stride"),
        (["eval", "tiny", "--eval-batch-size", "0"], "--eval-batch-size"),
        (["eval", "tiny", "--eval-seq-len", "0"], "--eval-seq-len"),
    ],
)
def test_invalid_numbers_are_refused_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "stride" not in err.replace("--eval-stride", "")


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_query_per_kv", 0), ("admm_iterations", -1), ("batch_size", 0), ("mlp_round_to", 0)],
)
def test_invalid_numbers_in_the_api_are_refused(field, value):
    with pytest.raises(StructPruneError, match=f"{field} must be an integer >= "):
        PruneConfig(**{field: value}).validate()


def test_api_inputs_are_read_as_meant():
    config = PruneConfig(units="mlp")  # not the letters m, l, p
    config.validate()
    assert config.units == ("mlp",)
    with pytest.raises(StructPruneError, match=r"'attention' not known"):
        PruneConfig(units=("mlp", "attention")).validate()
    model, ids = make_model("llama"), torch.randint(0, VOCAB, (4, 16))
    as_list = prune_model(model, ids.tolist(), PruneConfig(method="wanda-sp", units="mlp"), progress=False)
    as_tensor = prune_model(model, ids, PruneConfig(method="wanda-sp", units="mlp"), progress=False)
    assert as_list.plans[0].keep_mlp == as_tensor.plans[0].keep_mlp
    with pytest.raises(CalibrationDataError, match="equal lengths"):
        prune_model(model, [[1, 2, 3], [4]], PruneConfig(method="wanda-sp"), progress=False)
    with pytest.raises(CalibrationDataError, match="window length must be >= 2"):
        perplexity(model, ids.reshape(-1), seq_len=0, progress=False)


def test_library_failures_reach_the_user_as_one_line(capsys):
    assert run_cli("eval", "/nonexistent/folder") == 2
    one_line_error(capsys, "neither a known model name")
    assert run_cli("prune", "--model", "tiny", "--sparsity", "1.5") == 2
    one_line_error(capsys, "must be in [0, 1)")
