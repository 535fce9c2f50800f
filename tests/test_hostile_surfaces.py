"""Second hardening round: the surfaces added after the first one (exporters, sharded indexes,
concurrent runs, own-data sources, config sizes, allocation options), tried as a hostile or careless
user would. Each test reproduces a fault that was found, and fails without its fix.

Everything runs on the committed tiny model; a regression that would hang (a named pipe read) is
turned into a failure by a watchdog, never into a hung suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import one_line_error, run_cli, tree_digest
from struprune_plugin.checkpoint import load_pruned, read_model_config, save_pruned
from struprune_plugin.engine import PruneConfig
from struprune_plugin.errors import (
    CheckpointError,
    LayoutMismatchError,
    OutputBusyError,
    OutputExistsError,
    StructPruneError,
)
from struprune_plugin.outputs import lock_path, output_lock, write_folder_atomically

QUICK = ["--calib-samples", "4", "--calib-len", "64", "--no-progress"]
QUICK_EVAL = ["--texts", "wiki_test", "--eval-seq-len", "64", "--eval-max-windows", "2", "--no-progress"]
MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.2", "--no-eval", *QUICK]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A folder `struprune prune` wrote (per-layer widths), made once; tests only read it."""
    out = tmp_path_factory.mktemp("pruned") / "model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STRUPRUNE_CACHE", str(out.parent / "cache"))
        args = ["--sparsity", "0.3", "--admm-iterations", "0", "--no-eval", *QUICK]  # per-layer widths
        assert run_cli("prune", "--model", "tiny", *args, "--output", out) == 0
    widths = json.loads((out / "config.json").read_text())["struprune_layout"]["intermediate_sizes"]
    assert len(set(widths)) > 1
    return out


@pytest.fixture
def model_copy(tmp_path, tiny_trained_dir) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_trained_dir, folder)
    return folder


def _edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# -- 1. one output check for every writer ---------------------------------------------------------


def test_gguf_export_never_writes_inside_the_folder_it_reads(pruned, capsys):
    before = tree_digest(pruned)
    for target in ("model.safetensors", "model.gguf"):
        assert run_cli("export", "gguf", pruned, pruned / target, "--overwrite") == 2
        one_line_error(capsys, "lies inside the input model folder")
    assert tree_digest(pruned) == before


def test_gguf_overwrite_replaces_only_a_gguf_file(pruned, tmp_path, capsys):
    weights = tmp_path / "other-weights.safetensors"
    shutil.copyfile(pruned / "model.safetensors", weights)
    before = weights.read_bytes()
    assert run_cli("export", "gguf", pruned, weights, "--overwrite") == 2
    one_line_error(capsys, "replaces only a file this command wrote")
    assert weights.read_bytes() == before

    out = tmp_path / "model.gguf"
    assert run_cli("export", "gguf", pruned, out) == 0
    assert run_cli("export", "gguf", pruned, out) == 2  # exists, no --overwrite
    one_line_error(capsys, "already exists")
    assert run_cli("export", "gguf", pruned, out, "--overwrite", "--outtype", "f32") == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_eval_output_never_lands_in_the_model_folder_or_on_foreign_files(pruned, tmp_path, capsys):
    before = tree_digest(pruned)
    assert run_cli("eval", pruned, "--output", pruned / "config.json", "--overwrite", *QUICK_EVAL) == 2
    one_line_error(capsys, "lies inside the input model folder")
    assert tree_digest(pruned) == before

    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert run_cli("eval", "tiny", "--output", notes, *QUICK_EVAL) == 2
    one_line_error(capsys, "already exists")
    assert run_cli("eval", "tiny", "--output", notes, "--overwrite", *QUICK_EVAL) == 2
    one_line_error(capsys, "replaces only a file this command wrote")
    assert notes.read_text() == '{"mine": 1}'

    results = tmp_path / "eval.json"
    assert run_cli("eval", "tiny", "--output", results, *QUICK_EVAL) == 0
    assert run_cli("eval", "tiny", "--output", results, "--overwrite", *QUICK_EVAL) == 0
    assert "perplexity" in json.loads(results.read_text())


def test_vllm_export_refuses_its_input_before_loading(pruned, capsys, monkeypatch):
    import struprune_plugin.checkpoint as checkpoint

    def loading(*_a, **_k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(checkpoint, "load_pruned", loading)
    assert run_cli("export", "vllm", pruned, pruned / "vllm") == 2
    one_line_error(capsys, "lies inside the input model folder")


def test_onnx_export_outside_its_environment_says_where_torun_cli(tmp_path, pruned):
    try:
        import optimum.exporters.onnx  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("Optimum's ONNX exporter is installed here: this checks the main environment")
    done = subprocess.run(
        [sys.executable, "-m", "struprune_plugin.onnx_export", str(pruned), str(tmp_path / "onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "install_export_env.sh" in done.stderr and "Fix" in done.stderr
    assert not (tmp_path / "onnx").exists()


# -- 2. shard names stay inside the model folder --------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute"])
@pytest.mark.parametrize("stream", [False, True])
def test_index_naming_shards_outside_the_folder_is_refused(model_copy, tmp_path, where, stream, capsys):
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    shutil.move(model_copy / "model.safetensors", outside)
    name = "../elsewhere/x.safetensors" if where == "parent" else str(outside)
    with safe_open(outside, framework="pt") as f:
        weight_map = {key: name for key in f.keys()}  # noqa: SIM118
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    extra = ["--stream-weights"] if stream else []
    assert run_cli("prune", "--model", model_copy, *MAGNITUDE, *extra, "--output", out) == 2
    one_line_error(capsys, "inside", "x.safetensors")
    assert not out.exists()
    with pytest.raises(CheckpointError, match="inside"):
        load_pruned(model_copy)


# -- 3. two runs, one output ----------------------------------------------------------------------

_HOLDER = """
import sys, time
from struprune_plugin.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_run_on_the_same_output_is_refused_at_its_start(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out), "120"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        # --calib-len 100000 would fail only once the model is loaded: the claim comes first
        assert run_cli("prune", "--model", "tiny", *MAGNITUDE, "--output", out, "--calib-len", "100000") == 2
        one_line_error(capsys, "another struprune run", f"process {holder.pid}")
        assert time.perf_counter() - start < 60
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the kernel dropped its lock, so the next run proceeds
    assert lock_path(out).exists()
    assert run_cli("prune", "--model", "tiny", *MAGNITUDE, "--output", out) == 0
    assert (out / "struprune_manifest.json").is_file() and not lock_path(out).exists()


def test_two_runs_started_together_leave_exactly_one_result(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "STRUPRUNE_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "struprune_plugin.cli", "prune", "--model", "tiny", "--output", str(out)]
    runs = [
        subprocess.Popen([*cli, *MAGNITUDE[:2], "--sparsity", s, *MAGNITUDE[4:]], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for s in ("0.2", "0.4")
    ]  # fmt: skip
    results = [(run.wait(timeout=600), run.communicate()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    loser_err = next(err for code, (_, err) in results if code == 2)
    assert "another struprune run" in loser_err or "already exists" in loser_err
    report = json.loads((out / "struprune_report.json").read_text())
    assert report["pruning"]["requested_sparsity"] == (0.2, 0.4)[winner]


def test_a_folder_that_appears_during_the_write_is_never_replaced(tmp_path):
    out = tmp_path / "out"

    def build(tmp: Path) -> None:
        (tmp / "weights.bin").write_text("ours")
        out.mkdir()  # another program fills the output meanwhile
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(OutputExistsError, match="appeared while this run"):
        write_folder_atomically(out, build)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.unplaced-")]
    assert len(kept) == 1 and (kept[0] / "weights.bin").read_text() == "ours"


def test_the_claim_is_one_per_process_and_released(tmp_path):
    out = tmp_path / "a" / "out"
    with output_lock(out), output_lock(out):  # the CLI claims, then the writer it calls claims again
        assert lock_path(out).exists()
        other = subprocess.run(
            [sys.executable, "-c", _HOLDER, str(out), "0"], capture_output=True, text=True, timeout=300
        )
        assert other.returncode != 0 and OutputBusyError.__name__ in other.stderr
    assert not lock_path(out).exists()


# -- 4. (the recipe checks live in test_llmcompressor_modifier.py) ---------------------------------
# -- 5. no silent hangs ---------------------------------------------------------------------------


def test_config_naming_more_layers_than_the_weights_hold_fails_fast(model_copy, tmp_path, capsys):
    _edit_config(model_copy, num_hidden_layers=400)
    start = time.perf_counter()
    assert run_cli("prune", "--model", model_copy, *MAGNITUDE, "--output", tmp_path / "out") == 2
    one_line_error(capsys, "names 400 decoder layers", "layers 4-399 have no weights")
    assert time.perf_counter() - start < 120
    _edit_config(model_copy, num_hidden_layers=2)  # fewer: layers 2-3 would be dropped silently
    with pytest.raises(CheckpointError, match="also hold layers 2-3"):
        read_model_config(model_copy)


class _Unblock:
    """After `seconds`, keeps opening a named pipe for writing (and closing it) until the block
    ends, so a reader that blocks on it, however often it opens it, gets end-of-file: a regression
    fails the test instead of hanging the suite."""

    def __init__(self, fifo: Path, seconds: float = 60.0):
        self.fifo, self.done = fifo, threading.Event()
        self.thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)

    def _run(self, seconds: float) -> None:
        if self.done.wait(seconds):
            return
        while not self.done.wait(0.2):
            with contextlib.suppress(OSError):  # non-blocking: ENXIO while no reader has it open
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()


@pytest.mark.parametrize("option", ["--calib-data", "--text"])
def test_a_named_pipe_as_text_source_is_refused_not_read(tmp_path, option, capsys):
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    command = ["prune", "--model", "tiny", "--method", "wanda-sp", *QUICK, "--output", tmp_path / "out"]
    if option == "--text":
        command += ["--texts", "", "--text", fifo]
    else:
        command += ["--no-eval", "--calib-data", fifo]
    with _Unblock(fifo):
        assert run_cli(*command) == 2
    one_line_error(capsys, "not a regular file", "text.fifo")
    with _Unblock(fifo):
        assert run_cli("eval", "tiny", "--text", fifo, "--no-progress") == 2
    one_line_error(capsys, "not a regular file")


def test_named_pipes_inside_the_model_folder_are_refused(tmp_path, tiny_trained_dir):
    """In a child process with a time limit: safetensors and tokenizers open files in native code
    that holds the interpreter lock, so no watchdog thread could unblock a regression here."""
    names = ["config.json", "tokenizer.json", "model.safetensors"]
    folders = []
    for name in names:
        folder = tmp_path / name.replace(".", "-")
        shutil.copytree(tiny_trained_dir, folder)
        (folder / name).unlink()
        os.mkfifo(folder / name)
        folders.append(folder)
    env = {**os.environ, "STRUPRUNE_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "struprune_plugin.cli", "eval"]
    runs = [
        subprocess.Popen([*cli, str(f), *QUICK_EVAL], env=env, text=True, stderr=subprocess.PIPE)
        for f in folders
    ]
    try:
        errors = [run.communicate(timeout=300)[1] for run in runs]
    finally:
        for run in runs:
            run.kill()
    for name, run, err in zip(names, runs, errors):
        assert run.returncode == 2, err
        lines = [line for line in err.splitlines() if line.startswith("struprune: error:")]
        assert len(lines) == 1 and name in lines[0] and "Fix" in lines[0], err
        assert ("not a regular file" if name == "config.json" else "not regular files") in lines[0]


# -- 6. sizes in config.json ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("intermediate_size", -5), ("hidden_size", -128), ("num_attention_heads", 0), ("head_dim", 1.5)],
)
def test_invalid_sizes_in_config_name_the_file_and_field(model_copy, tmp_path, field, value, capsys):
    _edit_config(model_copy, **{field: value})
    assert run_cli("prune", "--model", model_copy, *MAGNITUDE, "--output", tmp_path / "out") == 2
    one_line_error(capsys, "config.json", field, "positive integer")


def test_a_width_edited_in_config_names_the_tensor(model_copy, capsys):
    _edit_config(model_copy, intermediate_size=256)
    assert run_cli("eval", model_copy, *QUICK_EVAL) == 2
    one_line_error(capsys, "mlp", "[128, 384]", "config.json builds")


# -- 7. settings accepted but meaningless ---------------------------------------------------------


def test_absurd_depth_prior_is_refused(tmp_path, capsys):
    for value in ("1e308", "101"):
        assert (
            run_cli("prune", "--model", "tiny", "--allocation", "energy", "--allocation-option",
                 f"depth_prior={value}", "--no-eval", *QUICK, "--output", tmp_path / "out")
            == 2
        )  # fmt: skip
        one_line_error(capsys, "depth_prior must be a weight in [0, 100]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "global-taylor"])
def test_allocation_options_on_a_method_without_allocation_are_refused(tmp_path, method, capsys):
    args = ["--method", method, "--allocation-option", "max_deviation=0.1", "--no-eval", *QUICK]
    assert run_cli("prune", "--model", "tiny", *args, "--output", tmp_path / "out") == 2
    one_line_error(capsys, "allocation options (max_deviation)", repr(method))
    with pytest.raises(StructPruneError, match="allocates as published"):
        PruneConfig(method=method, allocation_options={"lam": 0.05}).validate()


def test_unknown_allocation_options_are_refused_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import struprune_plugin.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_pruned", lambda *a, **k: pytest.fail("loaded first"))
    args = ["--allocation-option", "max_devation=0.1", "--no-eval", *QUICK, "--output", tmp_path / "o"]
    assert run_cli("prune", "--model", "tiny", *args) == 2
    one_line_error(capsys, "max_devation")


# -- 8. exit codes --------------------------------------------------------------------------------


def test_eval_of_a_folder_without_its_layout_key_exits_2(pruned, tmp_path, capsys):
    folder = tmp_path / "edited"
    shutil.copytree(pruned, folder)
    _edit_config(folder, struprune_layout=None)
    assert run_cli("eval", folder, *QUICK_EVAL) == 2
    one_line_error(capsys, "struprune_layout", "model_type 'struprune_llama'")
    with pytest.raises(LayoutMismatchError):
        load_pruned(folder)


def test_save_pruned_into_the_folder_it_came_from_is_refused(model_copy):
    model = load_pruned(model_copy)
    before = tree_digest(model_copy)
    with pytest.raises(StructPruneError, match="is the input model folder"):
        save_pruned(model, model_copy, overwrite=True)
    assert tree_digest(model_copy) == before


def test_modifier_report_never_lands_in_the_model_folder_or_on_foreign_files(model_copy, tmp_path):
    pytest.importorskip("llmcompressor")
    from llmcompressor.core import State

    from struprune_plugin.errors import OutputPathError
    from struprune_plugin.llmcompressor_modifier import StructPruneModifier

    model = load_pruned(model_copy)
    before = tree_digest(model_copy)
    modifier = StructPruneModifier(sparsity=0.3, report_path=str(model_copy / "config.json"))
    with pytest.raises(OutputPathError, match="lies inside the input model folder"):
        modifier.on_initialize(State(model=model))
    assert tree_digest(model_copy) == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    with pytest.raises(OutputExistsError, match="replaces only a file"):
        StructPruneModifier(sparsity=0.3, report_path=str(notes)).on_initialize(State(model=model))
    assert notes.read_text() == '{"mine": 1}'


# -- beyond the list: the same faults in the other paths a run reads --------------------------------


def test_a_cache_path_that_is_a_file_is_named(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("STRUPRUNE_CACHE", str(blocker / "cache"))
    args = ["--method", "wanda-sp", "--no-eval", *QUICK, "--output", tmp_path / "out"]
    assert run_cli("prune", "--model", "tiny", *args) == 2
    one_line_error(capsys, "STRUPRUNE_CACHE", "a-file")


def test_unknown_calibration_split_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli("prune", "--model", "tiny", "--calib-text", "wiki_tets", "--output", tmp_path / "out")
    assert exit_.value.code == 2
    assert "wiki_train" in capsys.readouterr().err
    assert run_cli("eval", "tiny", "--texts", "wiki_tets", "--no-progress") == 2
    one_line_error(capsys, "unknown text split 'wiki_tets'")
