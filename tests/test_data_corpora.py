"""Corpora: content, determinism, the calibration/evaluation split never overlaps, clear errors."""

import hashlib
import random
import sys

import pytest
import torch

from gptq_explorer.data import (
    CorpusError,
    calibration_ids,
    calibration_windows,
    corpus_info,
    corpus_parts,
    evaluation_ids,
    load_corpus,
)


def test_prose_is_the_sorted_pydoc_topics():
    import pydoc_data.topics as T

    text = load_corpus("prose")
    assert text == "\n\n".join(T.topics[k] for k in sorted(T.topics))
    info = corpus_info("prose")
    assert info.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert info.python_version == sys.version.split()[0] and info.chars == len(text)
    assert info.calib_chars + info.eval_chars == len(text)
    assert 0.3 < info.calib_chars / len(text) < 0.45


def test_code_is_the_stdlib_top_level_sources():
    text = load_corpus("code")
    assert text.startswith(open(__import__("__future__").__file__, encoding="utf-8").read())
    assert "def " in text and len(text) > 1_000_000


@pytest.mark.parametrize("name", ["prose", "code"])
def test_split_cuts_at_a_document_boundary(name):
    calib, ev = corpus_parts(name)
    assert calib + ev == load_corpus(name)
    assert calib.endswith("\n\n")  # whole documents on each side


def test_windows_are_deterministic_and_seeded(byte_tokenizer):
    a = calibration_windows(byte_tokenizer, "prose", nsamples=6, seqlen=64, seed=0)
    b = calibration_windows(byte_tokenizer, "prose", nsamples=6, seqlen=64, seed=0)
    c = calibration_windows(byte_tokenizer, "prose", nsamples=6, seqlen=64, seed=1)
    assert a.dtype == torch.long and a.shape == (6, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the paper's sampler: random.seed(seed); start = randint(0, N - seqlen - 1)
    ids = calibration_ids(byte_tokenizer, "prose")
    rnd = random.Random(0)
    starts = [rnd.randint(0, ids.numel() - 64 - 1) for _ in range(6)]
    assert torch.equal(a, torch.stack([ids[s : s + 64] for s in starts]))


def test_calibration_and_evaluation_never_overlap(byte_tokenizer):
    tok = byte_tokenizer
    calib_text, eval_text = corpus_parts("prose")
    cal, ev = calibration_ids(tok, "prose"), evaluation_ids(tok, "prose")
    # the two streams partition the text: calibration = first part only, evaluation = the rest only
    assert tok.decode(cal.tolist()) == calib_text and tok.decode(ev.tolist()) == eval_text
    w = calibration_windows(tok, "prose", nsamples=50, seqlen=128, seed=3)
    n = cal.numel()
    for row in w:  # every window is a slice of the calibration stream
        hits = (cal.unfold(0, 128, 1) == row).all(dim=1).nonzero()
        assert len(hits) >= 1 and int(hits[0]) + 128 <= n
    assert evaluation_ids(tok, "prose", n_tokens=1000).tolist() == ev[:1000].tolist()


def test_user_file(tmp_path, byte_tokenizer):
    f = tmp_path / "notes.txt"
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(40)]
    f.write_text("\n".join(lines), encoding="utf-8")
    calib, ev = corpus_parts(f)
    assert calib + ev == f.read_text() and calib.endswith("\n")  # cut at a line boundary
    assert corpus_info(str(f)).source.startswith("text file")
    w = calibration_windows(byte_tokenizer, f, nsamples=3, seqlen=32)
    assert w.shape == (3, 32)
    with pytest.raises(ValueError, match=r"has \d+ tokens .* fewer than one window of seqlen=5000"):
        calibration_windows(byte_tokenizer, f, nsamples=3, seqlen=5000)
    with pytest.raises(ValueError, match=r"fewer than one window of seqlen=5000"):
        evaluation_ids(byte_tokenizer, f, seqlen=5000)
    with pytest.raises(ValueError, match=r"asked for 100000 evaluation tokens but .* has only \d+"):
        evaluation_ids(byte_tokenizer, f, n_tokens=100_000)
    f.write_text("changed\n" * 300, encoding="utf-8")  # a changed file is re-read
    assert load_corpus(f) == "changed\n" * 300


def test_bad_files(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"not UTF-8 .*byte 3.*iconv"):
        load_corpus(tmp_path / "latin1.txt")
    with pytest.raises(CorpusError, match="not a file"):
        load_corpus(tmp_path)


@pytest.mark.parametrize("name", ["wikitext2", "c4", "ptb"])
def test_paper_datasets_without_datasets_package(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(CorpusError) as e:
        load_corpus(name)
    assert "`datasets`" in str(e.value) and "'prose'" in str(e.value)


@pytest.mark.slow
def test_smollm2_token_budget(smollm2):
    """Enough held-out tokens for the README runs: >= 64 windows of 1024 prose tokens, and the code split
    has far more; calibration has room for 128 x 512 random windows."""
    tok = smollm2.tokenizer
    full = evaluation_ids(tok, "prose")
    assert full.numel() >= 65536
    # asking for a prefix tokenizes only a prefix of the text, with the same tokens
    assert torch.equal(evaluation_ids(tok, "prose", n_tokens=20_000), full[:20_000])
    assert evaluation_ids(tok, "code", n_tokens=65536).numel() == 65536
    assert calibration_ids(tok, "prose").numel() > 40_000
    w = calibration_windows(tok, "prose", nsamples=128, seqlen=512)
    assert w.shape == (128, 512) and int(w.max()) < 49152
