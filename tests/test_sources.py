"""The user's own text: plain, JSON-lines and `datasets` sources read alike, fingerprinted, refused
clearly when unusable, and used for calibration (`--calib-data`) and evaluation (`--text`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from struprune_plugin.checkpoint import load_pruned
from struprune_plugin.cli import main
from struprune_plugin.data import sample_calibration, tokenize
from struprune_plugin.errors import CalibrationDataError
from struprune_plugin.evaluation import perplexity
from struprune_plugin.sources import read_text_source

PARAGRAPHS = [
    f"Paragraph {i}: the committee met on a {day} to discuss the harbour, the railway and the school "
    f"budget, and agreed to meet again after {i % 7 + 2} weeks."
    for i, day in zip(range(120), ["Monday", "Tuesday", "Friday"] * 40)
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    import datasets

    plain = tmp_path / "notes.txt"
    plain.write_text("\n\n".join(PARAGRAPHS))
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps({"body": p, "n": i}) + "\n" for i, p in enumerate(PARAGRAPHS)))
    array = tmp_path / "records.json"
    array.write_text(json.dumps([{"body": p} for p in PARAGRAPHS]))
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": PARAGRAPHS}).save_to_disk(str(folder))
    parquet = tmp_path / "records.parquet"
    datasets.Dataset.from_dict({"body": PARAGRAPHS}).to_parquet(str(parquet))
    return {"text": plain, "jsonl": jsonl, "json": array, "dataset": folder, "parquet": parquet}


def test_every_source_kind_reads_the_same_text(sources):
    expected = "\n\n".join(PARAGRAPHS)
    for kind, path in sources.items():
        source = read_text_source(path, text_field="body")
        assert source.text == expected, kind
    single = read_text_source(sources["jsonl"], text_field="body")
    assert single.sha256 == hashlib.sha256(sources["jsonl"].read_bytes()).hexdigest()  # = sha256sum
    assert single.describe() == {
        "source": str(sources["jsonl"]),
        "kind": "jsonl",
        "field": "body",
        "sha256": single.sha256,
    }


def test_a_changed_file_changes_the_fingerprint(sources):
    before = read_text_source(sources["dataset"], text_field="body").sha256
    import datasets

    datasets.Dataset.from_dict({"body": PARAGRAPHS[:-1]}).save_to_disk(str(sources["dataset"]))
    assert read_text_source(sources["dataset"], text_field="body").sha256 != before


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (b"", "empty.txt", "it is empty"),
        (b"too short", "short.txt", "9 characters"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "image.txt", "binary file"),
        ("caf\xe9 ".encode("latin-1") * 100, "latin1.txt", "not UTF-8"),
        (b'{"text": "fine"}\n{"text": broken\n', "bad.jsonl", "line 2, is not a JSON record"),
        (b'{"body": "x"}\n', "fields.jsonl", r"no field 'text' \(it has \['body'\]\).*--text-field"),
        (b'{"text": 5}\n', "numbers.jsonl", "not strings"),
    ],
)
def test_unusable_sources_are_refused_clearly(tmp_path, content, name, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=match):
        read_text_source(path)


def test_missing_sources_are_not_downloaded(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"does not exist.*nothing is downloaded"):
        read_text_source("wikitext")


def test_eval_on_own_text_equals_the_perplexity_of_that_text(sources, tiny_trained_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "eval.json"
    argv = ["eval", "tiny", "--text", sources["jsonl"], "--text-field", "body", "--eval-seq-len", "64"]
    assert main([str(a) for a in [*argv, "--no-progress", "--output", out]]) == 0
    got = json.loads(out.read_text())["perplexity"]
    assert list(got) == ["records.jsonl"]  # only the user's text when no --texts is given
    ids = tokenize(AutoTokenizer.from_pretrained(tiny_trained_dir), "\n\n".join(PARAGRAPHS))
    expected = perplexity(load_pruned(tiny_trained_dir), ids, seq_len=64, progress=False).ppl
    assert got["records.jsonl"]["ppl"] == pytest.approx(expected, rel=1e-6)


def test_prune_calibrates_on_own_data_reproducibly_and_reports_it(sources, tiny_trained_dir, tmp_path):
    from safetensors.torch import load_file

    base = ["prune", "--model", "tiny", "--method", "wanda-sp", "--sparsity", "0.3", "--calib-samples", "8"]
    base += ["--calib-len", "64", "--no-eval", "--no-progress"]
    own = [*base, "--calib-data", sources["jsonl"], "--text-field", "body"]
    for name, argv in (("a", own), ("b", own), ("builtin", base)):
        assert main([str(a) for a in [*argv, "--output", tmp_path / name]]) == 0
    weights = {n: load_file(tmp_path / n / "model.safetensors") for n in ("a", "b", "builtin")}
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])  # seeded
    assert any(
        weights["a"][k].shape != weights["builtin"][k].shape
        or not torch.equal(weights["a"][k], weights["builtin"][k])
        for k in weights["a"]
    )
    calibration = json.loads((tmp_path / "a" / "struprune_report.json").read_text())["calibration"]
    assert calibration["source"] == str(sources["jsonl"]) and calibration["kind"] == "jsonl"
    assert calibration["sha256"] == hashlib.sha256(sources["jsonl"].read_bytes()).hexdigest()
    assert "records.jsonl" in (tmp_path / "a" / "struprune_report.md").read_text()


def test_a_source_too_short_for_the_windows_is_refused(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "short.txt"
    path.write_text(PARAGRAPHS[0] * 3)
    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "tiny-llama-gqa")
    with pytest.raises(CalibrationDataError, match="shorter than one window"):
        sample_calibration(tokenize(tok, read_text_source(path).text), 4, 512)
