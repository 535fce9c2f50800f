"""Real text from the gensim wheel, checksummed; the calibration sampler."""

from __future__ import annotations

import re

import pytest
import torch

from struprune_plugin.data import TEXT_SHA256, ensure_texts, sample_calibration, sha256_text
from struprune_plugin.errors import CalibrationDataError


def test_texts_are_built_and_verified(tmp_path):
    corpus = ensure_texts(tmp_path / "texts")
    for split, digest in TEXT_SHA256.items():
        text = corpus.read(split)
        assert sha256_text(text) == digest
    test = corpus.read("wiki_test")
    assert " = = " in test and len(test.split()) > 40_000
    titles = {s: set(re.findall(r"^ = ([^=].*?) = $", corpus.read(s), flags=re.M)) for s in TEXT_SHA256}
    assert len(titles["wiki_test"]) == 9 and len(titles["wiki_train"]) > 60
    assert not titles["wiki_train"] & titles["wiki_test"] and not titles["wiki_valid"] & titles["wiki_test"]
    corrupted = corpus.path("news")
    corrupted.write_text("tampered")
    ensure_texts(tmp_path / "texts")  # detects the mismatch and rebuilds
    assert sha256_text(corpus.read("news")) == TEXT_SHA256["news"]


def test_calibration_sampler_is_reproducible():
    ids = torch.arange(1000)
    a = sample_calibration(ids, 8, 64, seed=1)
    b = sample_calibration(ids, 8, 64, seed=1)
    c = sample_calibration(ids, 8, 64, seed=2)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous windows


@pytest.mark.parametrize(
    ("n", "length", "match"), [(0, 64, "at least 1 sample"), (4, 2000, "shorter than one window")]
)
def test_calibration_errors(n, length, match):
    with pytest.raises(CalibrationDataError, match=match):
        sample_calibration(torch.arange(1000), n, length)


def test_calibration_windows_start_with_bos_when_asked():
    """BOS + seq_len - 1 text tokens per window (same starts as without), so the token budget
    and the seeded sampling stay the same and only the sink token is added."""
    from struprune_plugin.data import sample_calibration

    ids = torch.arange(1000) + 10
    plain = sample_calibration(ids, 6, 32, seed=3)
    with_bos = sample_calibration(ids, 6, 32, seed=3, bos_token_id=2)
    assert with_bos.shape == plain.shape == (6, 32)
    assert (with_bos[:, 0] == 2).all()
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])


def test_newsgroup_posts_are_read_without_unpickling(tmp_path):
    """The parser reads the protocol-0 text of a pickle: posts (strings with a Subject header) lose
    their headers; other strings (descriptions, group names, file names) are skipped."""
    import pickle
    import zlib

    from struprune_plugin.data import newsgroup_posts

    posts = [
        "From: a@b.c\nSubject: Re: orbits\nLines: 2\n\nThe shuttle's orbit decays.\n> quoted — ünïcode\n",
        "Newsgroups: alt.atheism\nSubject: hello\n\nSecond body.",
    ]
    payload = {"data": posts, "target_names": ["sci.space", "alt.atheism"], "DESCR": None}
    path = tmp_path / "mini"
    path.write_bytes(zlib.compress(pickle.dumps(payload, protocol=0)))
    assert newsgroup_posts(path) == "The shuttle's orbit decays.\n> quoted — ünïcode\n\nSecond body.\n"
    real = ensure_texts(tmp_path / "texts").read("newsgroups")
    assert "\nPath: " not in real and real.count("writes:") > 50  # 200 posts, headers gone
