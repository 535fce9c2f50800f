"""Data-parallel calibration on torch.distributed (gloo, two CPU processes): the same decisions
and the same weights (within float tolerance) as one process over all the windows."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import VOCAB, folder_tensors, make_model
from struprune_plugin import distributed
from struprune_plugin.engine import PruneConfig, prune_model

CASES = {
    "structprune": dict(sparsity=0.4),
    "structprune-subsample": dict(sparsity=0.4, solver_tokens=100, bias_refit=True),
    "kl-knapsack": dict(sparsity=0.3, allocation="kl-knapsack", sensitivity_samples=2),
    "energy-softmax": dict(sparsity=0.3, temperature=1.0, energy_samples=4),
    "wanda-sp": dict(method="wanda-sp", sparsity=0.4),
    "flap": dict(method="flap", sparsity=0.4),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    torch.manual_seed(1)
    return make_model("llama", layers=3), torch.randint(0, VOCAB, (7, 24))  # 7 windows: 4 + 3


def _run(case: str):
    model, ids = _inputs()
    result = prune_model(model, ids, PruneConfig(batch_size=2, **CASES[case]), progress=False)
    state = {k: v.clone() for k, v in result.model.state_dict().items()}
    return [(p.keep_mlp, p.keep_heads, p.keep_kv_heads) for p in result.plans], state


def _worker(rank: int, port: int, case: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        plans, state = _run(case)
        torch.save({"plans": plans, "state": state, "rank": distributed.rank()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_shard_windows_blocks_cover_every_window_once(monkeypatch):
    ids = torch.arange(7)[:, None]
    blocks = []
    for r in range(3):
        monkeypatch.setattr(distributed, "active", lambda: True)
        monkeypatch.setattr(distributed, "world", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        blocks.append(distributed.shard_windows(ids)[:, 0].tolist())
    assert blocks == [[0, 1, 2], [3, 4], [5, 6]]


#: Two gloo ranks per case; the fast tier runs the default and the energy pass, the slow tier all.
FAST_CASES = ("structprune", "energy-softmax")


@pytest.mark.parametrize(
    "case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_two_gloo_ranks_match_one_process(case, tmp_path):
    single_plans, single_state = _run(case)
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), case, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1)]
    assert [got["rank"] for got in ranks] == [0, 1]  # both ran as ranks of one group
    for got in ranks:
        assert got["plans"] == single_plans  # the same heads and channels in every layer
        assert sorted(got["state"]) == sorted(single_state)
        for key, want in single_state.items():
            torch.testing.assert_close(got["state"][key], want, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow  # torchrun launches three interpreters, each importing torch and transformers
def test_torchrun_cli_equals_one_process(tiny_trained_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m struprune_plugin.cli prune ...` (gloo on CPU): rank 0 saves
    the same kept widths and weights (within float tolerance) as the one-process command, and
    the report records two processes."""
    import json
    import subprocess
    import sys

    # 768 tokens for 384 MLP channels: with fewer tokens than channels the refits' Gram is
    # singular up to the damping, and float summation order alone moves the weights by 1e-3.
    args = ["prune", "--model", str(tiny_trained_dir), "--sparsity", "0.3", "--calib-samples", "6"]
    args += ["--calib-len", "128", "--batch-size", "2", "--no-eval", "--no-progress", "--stream-weights"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRUPRUNE_CACHE": str(tmp_path / "cache")}
    one = subprocess.run(
        [sys.executable, "-m", "struprune_plugin.cli", *args, "--output", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "struprune_plugin.cli",
            *args,
            "--output",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "struprune_report.json").read_text())
    assert report["pruning"]["processes"] == 2
    ref = json.loads((tmp_path / "one" / "struprune_report.json").read_text())
    assert report["layers"] == [
        {**r, "seconds": t["seconds"]} for r, t in zip(ref["layers"], report["layers"])
    ]

    a, b = folder_tensors(tmp_path / "one"), folder_tensors(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def _oneshot_worker(rank: int, port: int, tiny_dir: str, settings: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, tokenizer, ids = _tiny_inputs(tiny_dir)
        start, stop = distributed.window_range(len(ids))  # as llm-compressor's get_rank_partition
        pruned = _oneshot(model, tokenizer, ids[start:stop], settings)
        torch.save({k: v.clone() for k, v in pruned.state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _tiny_inputs(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(0)
    return model, AutoTokenizer.from_pretrained(tiny_dir), torch.randint(3, model.config.vocab_size, (8, 96))


def _oneshot(model, tokenizer, ids, settings):
    import datasets
    from llmcompressor import oneshot

    from struprune_plugin.llmcompressor_modifier import StructPruneModifier

    return oneshot(
        model=model,
        processor=tokenizer,
        dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
        recipe=[StructPruneModifier(**settings)],
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(dict(sparsity=0.4, admm_iterations=2), id="uniform"),
        pytest.param(
            dict(sparsity=0.35, temperature=1.0, energy_samples=4),
            id="energy-softmax",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_modifier_under_two_gloo_ranks_matches_one_process(tiny_trained_dir, tmp_path, settings):
    """StructPruneModifier in llm-compressor's oneshot with the dataset partitioned per rank (two
    gloo processes) prunes as one process on the whole dataset does."""
    pytest.importorskip("llmcompressor")
    model, tokenizer, ids = _tiny_inputs(tiny_trained_dir)
    single = {k: v.clone() for k, v in _oneshot(model, tokenizer, ids, settings).state_dict().items()}
    out = str(tmp_path / "rank")
    mp.spawn(_oneshot_worker, args=(_free_port(), str(tiny_trained_dir), settings, out), nprocs=2, join=True)
    for r in (0, 1):
        got = torch.load(f"{out}.{r}", weights_only=False)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in single.items()}
        for key, want in single.items():
            torch.testing.assert_close(got[key], want, rtol=1e-3, atol=1e-4, msg=key)
