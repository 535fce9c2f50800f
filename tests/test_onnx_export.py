"""ONNX export of pruned folders through Optimum, checked in ONNX Runtime token for token.

Runs in the export environment (`bash scripts/install_export_env.sh`, transformers 4.57 +
optimum-onnx), where it also covers pruning, saving and loading on the 4.5x transformers line;
skipped in the main environment, which cannot have optimum-onnx.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("optimum.onnxruntime")

from transformers import AutoModelForCausalLM

from conftest import VOCAB, logits, make_model
from struprune_plugin.architectures import model_view
from struprune_plugin.checkpoint import save_pruned
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.onnx_export import compare_generation, cpu_session_options, export_onnx, ort_model_class

pytestmark = pytest.mark.slow  # the export environment's tests (Optimum's ONNX exporter, ONNX Runtime)


def _pruned(family, **kw):
    model = make_model(family, layers=3)
    calib = torch.randint(0, VOCAB, (4, 16))
    # the absolute-energy softmax: on these tiny models it moves whole K/V groups between layers
    settings = {"sparsity": 0.4, "allocation": "energy", "temperature": 1.0, "admm_iterations": 1, **kw}
    return prune_model(model, calib, PruneConfig(**settings), progress=False).model


def heads(model):
    return [lv.num_heads for lv in model_view(model).layer_views()]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3"])
def test_per_layer_widths_export_and_generate_token_for_token(family, tmp_path):
    pruned = _pruned(family)
    assert (
        len(set(heads(pruned))) > 1
        or len({lv.intermediate_size for lv in model_view(pruned).layer_views()}) > 1
    )
    folder = save_pruned(pruned, tmp_path / "pruned")
    # the folder loads on this transformers line too, with identical logits
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder), ids), logits(pruned, ids))
    onnx_dir = export_onnx(folder, tmp_path / "onnx")
    assert (onnx_dir / "model.onnx").exists()
    assert json.loads((onnx_dir / "config.json").read_text())["model_type"] == family
    prompts = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    report = compare_generation(folder, onnx_dir, prompts, new_tokens=12)
    assert report["uses_kv_cache"] and report["generated"] == 12
    assert report["tokens_equal"], report
    assert report["max_logit_diff"] < 1e-4


def test_equal_widths_export_as_a_stock_model(tmp_path):
    pruned = _pruned("llama", temperature=float("inf"), equal_widths=True)
    folder = save_pruned(pruned, tmp_path / "pruned")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    onnx_dir = export_onnx(folder, tmp_path / "onnx")
    prompts = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    assert compare_generation(folder, onnx_dir, prompts, new_tokens=8)["tokens_equal"]
    # the CPU generation options reach the session ONNX Runtime builds
    session = ort_model_class().from_pretrained(onnx_dir, session_options=cpu_session_options(1)).session
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("family", ["llama_mha", "opt"])
def test_per_layer_kv_heads_export_and_generate(family, tmp_path):
    pruned = _pruned(family)  # MHA: heads go as whole K/V groups, so K/V counts differ per layer
    kv = [lv.num_kv_heads for lv in model_view(pruned).layer_views()]
    assert len(set(kv)) > 1, kv
    folder = save_pruned(pruned, tmp_path / "pruned")
    onnx_dir = export_onnx(folder, tmp_path / "onnx")
    prompts = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    report = compare_generation(folder, onnx_dir, prompts, new_tokens=10)
    assert report["uses_kv_cache"] and report["tokens_equal"], report


def test_optimum_cli_exports_a_pruned_folder(tmp_path):
    folder = save_pruned(_pruned("llama"), tmp_path / "pruned")
    cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [cli, "export", "onnx", "--model", str(folder), "--task", "text-generation-with-past",
         "--trust-remote-code", str(tmp_path / "onnx")],
        check=True, env=env, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    assert (tmp_path / "onnx" / "model.onnx").exists()


def _planted_folder(tmp_path):
    """A pruned folder with per-layer widths whose copy of modeling_struprune.py has been tampered
    with: importing it writes a marker file, so a test can tell whether the folder's code ran."""
    folder = save_pruned(_pruned("llama"), tmp_path / "pruned")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "struprune_llama" and "auto_map" in config
    marker = tmp_path / "folder-code-ran"
    with open(folder / "modeling_struprune.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def _export_cli(folder, tmp_path, *flags):
    """`python -m struprune_plugin.onnx_export` in a fresh process (a remote-code import cannot leak
    into this one), with its own module cache; returns its JSON report."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-m", "struprune_plugin.onnx_export", str(folder), str(tmp_path / "onnx"),
         "--new-tokens", "6", *flags],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout[run.stdout.index("{") :])


def test_export_never_runs_the_folders_code_without_trust_remote_code(tmp_path):
    folder, marker = _planted_folder(tmp_path)
    report = _export_cli(folder, tmp_path)
    assert report["tokens_equal"] and report["uses_kv_cache"] and report["generated"] == 6, report
    assert not marker.exists(), "the export ran the folder's modeling_struprune.py"
    assert not (tmp_path / "onnx" / "modeling_struprune.py").exists()


def test_trust_remote_code_runs_the_folders_code(tmp_path):
    folder, marker = _planted_folder(tmp_path)
    report = _export_cli(folder, tmp_path, "--trust-remote-code")
    assert report["tokens_equal"], report
    assert marker.read_text() == "ran"


def test_unregistered_model_type_refuses_instead_of_running_the_folders_code(tmp_path):
    folder, marker = _planted_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "struprune_unknown"  # no class is registered for it; the auto_map stays
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        export_onnx(folder, tmp_path / "onnx")
    assert not marker.exists()
