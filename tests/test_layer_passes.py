"""The shortcuts of the per-layer passes are exact: a pass stopped at the MLP records what the full
pass records, replayed attention gives the full layer's output bit for bit, and the engine's
result with the replay equals the result with full output passes."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, VOCAB, family_params, make_model
from struprune_plugin import engine
from struprune_plugin.architectures import model_view
from struprune_plugin.engine import PruneConfig, capture_layer_inputs, layer_forward, prune_model
from struprune_plugin.layer_passes import AttentionCache, run_until_stop, stop_at
from struprune_plugin.stats import InputRecorder


def _first_layer(family: str):
    model = make_model(family, layers=2).eval()
    view = model_view(model)
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    batches = capture_layer_inputs(model, view, [ids[:2], ids[2:]], torch.device("cpu"))
    return view.layer_views()[0], batches


def _calls(module: torch.nn.Module) -> list:
    calls: list = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_a_pass_stopped_at_the_mlp_records_what_the_full_pass_records(family):
    lv, batches = _first_layer(family)
    tap = lv.input_taps()["mlp_in"]
    recorded = []
    for stop in (False, True):
        with torch.no_grad(), InputRecorder({"mlp_in": tap}, 0, keep_inputs=("mlp_in",)) as rec:
            down = _calls(lv.mlp_out)
            with stop_at(tap) if stop else torch.no_grad():
                for b in batches:
                    run_until_stop(layer_forward, lv.layer, b)
        lv.mlp_out._forward_pre_hooks.clear()
        recorded.append(torch.cat(rec.stats["mlp_in"].inputs))
        assert (len(down) == 0) == stop  # stopped: the MLP's output projection never ran
    assert torch.equal(recorded[0], recorded[1])
    assert not lv.mlp_out._forward_pre_hooks and not tap._forward_pre_hooks  # nothing left behind


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_replayed_attention_gives_the_full_layers_output(family):
    lv, batches = _first_layer(family)
    cache = AttentionCache()
    with torch.no_grad():
        with cache.recording(lv.attn):
            full = [layer_forward(lv.layer, b) for b in batches]
        assert cache.usable_for(lv.attn, len(batches))
        q_calls = _calls(lv.input_taps()["attn_in"])
        with cache.replaying(lv.attn):
            replayed = [layer_forward(lv.layer, b) for b in batches]
    assert not q_calls  # attention's projections did not run
    assert all(torch.equal(a, b) for a, b in zip(full, replayed))
    assert "forward" not in lv.attn.__dict__  # the module's own forward is back
    assert not cache.usable_for(lv.attn, len(batches))  # a cache serves one output pass


def test_replay_refuses_a_different_number_of_batches():
    lv, batches = _first_layer("llama")
    cache = AttentionCache()
    with torch.no_grad():
        with cache.recording(lv.attn):
            for b in batches:
                layer_forward(lv.layer, b)
        with pytest.raises(RuntimeError, match="fewer batches"), cache.replaying(lv.attn):
            layer_forward(lv.layer, batches[0])
    assert "forward" not in lv.attn.__dict__


@pytest.mark.parametrize("family", family_params(["llama", "gemma3", "qwen2", "phi3", "opt"]))
@pytest.mark.parametrize("units", [("mlp",), ("mlp", "heads")])
def test_the_engine_with_replayed_attention_equals_full_output_passes(family, units, monkeypatch):
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    config = PruneConfig(sparsity=0.4, units=units, kind_split="ratio", batch_size=2, mlp_round_to=1)
    replays: list = []
    original = AttentionCache.replaying

    def counted(self, attn):
        replays.append(attn)
        return original(self, attn)

    monkeypatch.setattr(AttentionCache, "replaying", counted)
    results = []
    for reuse in (True, False):
        monkeypatch.setattr(engine, "REUSE_ATTENTION", reuse)
        results.append(prune_model(make_model(family, layers=3), ids, config, progress=False).model)
        if reuse:
            assert len(replays) == 2  # every output pass but the last layer's (none) replayed
    a, b = (dict(m.named_parameters()) for m in results)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
