"""End-to-end healing against independent checks: the streamed teacher pass gives the model's own
top-k logits on every family, the loss equals a KL computed by hand on the bucketed distributions,
distillation lowers the held-out KL to the teacher (recomputed here), LoRA merges back into the
pruned model's own modules, and an interrupted run resumed from its checkpoint ends where an
uninterrupted one does."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_TRAINED, make_model
from struprune_plugin.engine import PruneConfig, prune_model
from struprune_plugin.healing import distill as distill_module
from struprune_plugin.healing.distill import DistillConfig, distill, heal_loss
from struprune_plugin.healing.layerwise import HealConfigError
from struprune_plugin.healing.teacher import teacher_top_k


def test_streamed_teacher_pass_gives_the_models_own_top_k(family):
    model = make_model(family, layers=3).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    top = teacher_top_k(model, ids, k=5, temperature=2.0, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    want = logits.topk(5, dim=-1)
    torch.testing.assert_close(top.values, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(top.indices, want.indices)
    torch.testing.assert_close(top.log_normalizer, (logits / 2.0).logsumexp(-1), rtol=1e-5, atol=1e-5)


def _bucketed_kl(teacher_logits, student_logits, k: int, t: float) -> torch.Tensor:
    """KL over {top-k tokens of the teacher, everything else}, summed token by token in a loop."""
    total, count = 0.0, 0
    for tl, sl in zip(
        teacher_logits.reshape(-1, teacher_logits.shape[-1]),
        student_logits.reshape(-1, teacher_logits.shape[-1]),
    ):
        p, q = torch.softmax(tl.double() / t, -1), torch.softmax(sl.double() / t, -1)
        keep = tl.topk(k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[keep] = False
        pb = torch.cat([p[keep], p[rest].sum().view(1)])
        qb = torch.cat([q[keep], q[rest].sum().view(1)])
        nonzero = pb > 0  # 0 log 0 = 0: the bucket is empty when every token is kept
        total += float((pb[nonzero] * (pb[nonzero] / qb[nonzero]).log()).sum())
        count += 1
    return torch.tensor(total / count * t * t)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_top_k_loss_is_the_kl_of_the_bucketed_distributions(k):
    g = torch.Generator().manual_seed(k)
    teacher, student = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    ids = torch.zeros(2, 5, dtype=torch.long)
    config = DistillConfig(temperature=1.5, top_k=k)
    top = teacher.topk(k, dim=-1)
    got = heal_loss(student, ids, config, None, top.values, top.indices, (teacher / 1.5).logsumexp(-1))
    torch.testing.assert_close(got, _bucketed_kl(teacher, student, k, 1.5).float(), rtol=1e-4, atol=1e-5)
    full = heal_loss(student, ids, DistillConfig(temperature=1.5, top_k=0), teacher_logits=teacher)
    if k == 40:  # every token kept: the full KL
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)
    assert (
        heal_loss(teacher, ids, config, None, top.values, top.indices, (teacher / 1.5).logsumexp(-1)) < 1e-5
    )


def test_cross_entropy_loss_is_next_token_nll():
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    want = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(heal_loss(logits, ids, DistillConfig(loss="ce")), want)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from struprune_plugin.data import ensure_texts, sample_calibration, tokenize

    teacher = AutoModelForCausalLM.from_pretrained(TINY_TRAINED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(TINY_TRAINED)
    corpus = ensure_texts()
    calib = sample_calibration(tokenize(tok, corpus.read("wiki_train")), 32, 64, seed=0)
    held_out = tokenize(tok, corpus.read("wiki_valid"))[: 64 * 8].view(8, 64)
    pruned = prune_model(teacher, calib, PruneConfig(sparsity=0.5, admm_iterations=1), progress=False).model
    return teacher, pruned, calib, held_out


def _kl_to_teacher(student, teacher, ids) -> float:
    with torch.no_grad():
        p = teacher(input_ids=ids).logits.log_softmax(-1)
        q = student(input_ids=ids).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize(
    "config",
    [
        DistillConfig(lr=5e-4, top_k=16, batch_size=4, micro_batch_size=2, epochs=2),
        DistillConfig(lr=5e-4, top_k=0, batch_size=4, epochs=2),
        DistillConfig(lr=3e-3, top_k=16, lora_rank=4, batch_size=4, epochs=2),
        pytest.param(
            DistillConfig(lr=5e-4, top_k=16, batch_size=4, epochs=2, bf16=True), marks=pytest.mark.slow
        ),
    ],
    ids=["top-k", "full-logits", "lora", "bf16-autocast"],
)
def test_distillation_lowers_the_held_out_kl_to_the_teacher(tiny, tmp_path, config):
    teacher, pruned, calib, held_out = tiny
    before = _kl_to_teacher(pruned, teacher, held_out)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = copy.deepcopy(pruned)
    healed, record = distill(student, teacher, calib, config, tmp_path / "work", progress=False)
    assert record.steps == 2 * len(calib) // config.batch_size and len(record.losses) == record.steps
    assert _kl_to_teacher(healed, teacher, held_out) < 0.95 * before
    assert type(healed) is type(pruned)  # LoRA merged back: the pruned model's own class and modules
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    assert {k: v.shape for k, v in healed.state_dict().items()} == shapes
    assert all(p.dtype == torch.float32 for p in healed.parameters())  # bf16 autocast keeps fp32 weights
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


@pytest.mark.slow
def test_finetuning_lowers_the_training_loss(tiny, tmp_path):
    _, pruned, calib, _ = tiny
    config = DistillConfig(loss="ce", lr=2e-3, batch_size=4)

    def nll(model) -> float:
        with torch.no_grad():
            return float(model(input_ids=calib, labels=calib).loss)

    before = nll(pruned)
    healed, _ = distill(copy.deepcopy(pruned), None, calib, config, tmp_path / "work", progress=False)
    assert nll(healed) < before


def test_an_interrupted_run_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    teacher, pruned, calib, _ = tiny
    config = DistillConfig(lr=5e-4, top_k=16, batch_size=4, micro_batch_size=4, save_every=3)
    reference, _ = distill(copy.deepcopy(pruned), teacher, calib, config, tmp_path / "ref", progress=False)

    calls = {"n": 0}
    real_loss = distill_module.heal_loss

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distill_module, "heal_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(pruned), teacher, calib, config, tmp_path / "run", progress=False)
    monkeypatch.setattr(distill_module, "heal_loss", real_loss)
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    healed, record = distill(
        copy.deepcopy(pruned), teacher, calib, config, tmp_path / "run", resume=True, progress=False
    )
    assert record.resumed_from.endswith("checkpoint-3") and record.steps == len(calib) // 4
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(healed.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_bad_distillation_settings_are_refused(tiny, tmp_path):
    teacher, pruned, calib, _ = tiny
    with pytest.raises(HealConfigError, match="multiple of the micro-batch"):
        DistillConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(HealConfigError, match="needs the dense teacher"):
        distill(copy.deepcopy(pruned), None, calib, DistillConfig(), tmp_path, progress=False)
    with pytest.raises(HealConfigError, match="dense model the pruned one was made from"):
        distill(copy.deepcopy(pruned), make_model("llama", layers=3), calib, DistillConfig(), tmp_path)
    with pytest.raises(HealConfigError, match="CUDA_VISIBLE_DEVICES"):
        distill(copy.deepcopy(pruned), teacher, calib, DistillConfig(), tmp_path, device="cuda:1")
