"""Calibration and evaluation text, and deterministic token windows drawn from it.

Corpora (by name):
  "prose"      CPython's language-reference text (pydoc_data.topics), always installed, PSF licence.
  "code"       the standard library's top-level *.py files, always installed, PSF licence.
  a file path  any UTF-8 text file of yours.
  "wikitext2", "c4", "ptb"  the GPTQ paper's datasets through the `datasets` package (needs it installed and
               the hub reachable or cached); prepared exactly like the paper's datautils.py.

The split (calibration and evaluation never overlap):
  * local corpora are split by characters, tokenizer-independently: the calibration part is the first 35%
    of the text and the evaluation part the remaining 65%, cut at a document boundary (a topic for
    "prose", a file for "code", a line for your own file). Each part is tokenized on its own
    (add_special_tokens=False), so no calibration window can contain an evaluation token.
  * the paper's datasets use their own splits: calibration from train, evaluation from test (wikitext2),
    validation (ptb, c4), tokenized with the tokenizer's default special tokens as the paper's code does.

Topics and stdlib sources differ between Python patch versions, so corpus_info() records the sha256 of
the text and the Python version; compare numbers only when both match.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import sys
import sysconfig
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

CALIB_FRACTION = 0.35  # the first 35% of a local corpus calibrates, the last 65% evaluates
LOCAL_CORPORA = ("prose", "code")
PAPER_DATASETS = ("wikitext2", "c4", "ptb")
CORPORA = LOCAL_CORPORA + PAPER_DATASETS


class CorpusError(ValueError):
    """A corpus could not be loaded or is unusable; the message says why and what to do."""


@dataclass(frozen=True)
class CorpusInfo:
    name: str
    source: str  # a sentence for humans
    sha256: str  # of the full text (local corpora) or of calibration + evaluation text (datasets)
    python_version: str
    chars: int
    calib_chars: int
    eval_chars: int
    split: str  # how calibration and evaluation were separated


@dataclass(frozen=True)
class _Parts:
    info: CorpusInfo
    calib: str
    eval: str
    paper: bool = False  # tokenize the paper's way (default special tokens)
    c4_docs: tuple | None = None  # c4 only: (train texts, validation texts); windows come from documents


# ---------------------------------------------------------------------------------------------------------
# loading text


def _prose_docs() -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def _code_docs() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:  # pragma: no cover - a stripped interpreter
        raise CorpusError(f"no *.py files in the standard library folder {root}; use 'prose' or a text file")
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            docs.append(fh.read())
    return docs


def _read_text_file(path: Path) -> str:
    if not path.exists():
        raise CorpusError(
            f"corpus file {path} does not exist. Pass an existing UTF-8 text file, or one of: "
            f"{', '.join(CORPORA)}."
        )
    if not path.is_file():
        raise CorpusError(f"corpus path {path} is not a file (a folder?). Pass a UTF-8 text file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}). "
            "Convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`, or save it as UTF-8."
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty (or only whitespace). Put some text in it.")
    return text


def _cut_docs(docs: list[str], sep: str) -> tuple[str, str]:
    """Join documents; the calibration part is whole documents up to CALIB_FRACTION of the characters."""
    total = sum(len(d) for d in docs) + len(sep) * (len(docs) - 1)
    acc, k = 0, 0
    while k < len(docs) - 1 and acc < CALIB_FRACTION * total:
        acc += len(docs[k]) + len(sep)
        k += 1
    return sep.join(docs[:k]) + sep, sep.join(docs[k:])  # calib + eval == the joined text


def _cut_lines(text: str) -> tuple[str, str]:
    """A user's file: cut at the first line break after CALIB_FRACTION of the characters."""
    at = int(len(text) * CALIB_FRACTION)
    nl = text.find("\n", at)
    cut = nl + 1 if 0 <= nl < len(text) - 1 else at
    return text[:cut], text[cut:]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _local_parts(name: str) -> _Parts:
    py = sys.version.split()[0]
    if name in LOCAL_CORPORA:
        docs = _prose_docs() if name == "prose" else _code_docs()
        text = "\n\n".join(docs)
        calib, ev = _cut_docs(docs, "\n\n")
        unit = "topic" if name == "prose" else "file"
        src = (
            f"CPython {py} pydoc_data.topics ({len(docs)} topics sorted by key, joined with blank lines)"
            if name == "prose"
            else f"CPython {py} standard library, {len(docs)} top-level *.py files sorted by name"
        )
    else:
        path = Path(name).expanduser()
        text = _read_text_file(path)
        calib, ev = _cut_lines(text)
        unit = "line"
        src = f"text file {path.resolve()}"
    split = (
        f"first {CALIB_FRACTION:.0%} of the characters (cut at a {unit} boundary) calibrate, "
        f"the rest evaluates"
    )
    info = CorpusInfo(name, src, _sha(text), py, len(text), len(calib), len(ev), split)
    return _Parts(info, calib, ev)


def _load_dataset(*args, **kwargs):
    try:
        import datasets  # noqa: F401  (optional, heavy: imported only here)
    except ImportError:
        raise CorpusError(
            f"corpus '{args[0]}' needs the `datasets` package, which is not installed "
            "(pip install datasets), plus access to the Hugging Face hub or a cached copy. "
            "Offline alternatives: 'prose', 'code' or a path to a UTF-8 text file."
        ) from None
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:
        raise CorpusError(
            f"could not load dataset {args} ({type(exc).__name__}: {str(exc)[:300]}). It needs the Hugging "
            "Face hub (or a cached copy; HF_DATASETS_OFFLINE=1 uses only the cache). Offline alternatives: "
            "'prose', 'code' or a path to a UTF-8 text file."
        ) from exc


def _paper_parts(name: str) -> _Parts:
    py = sys.version.split()[0]
    c4_docs = None
    if name == "wikitext2":  # datautils.get_wikitext2
        train = _load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = _load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        calib, ev = "\n\n".join(train["text"]), "\n\n".join(test["text"])
        split, src = "train split calibrates, test split evaluates", "wikitext-2-raw-v1 (datasets)"
    elif name == "ptb":  # datautils.get_ptb: evaluation on the validation split
        train = _load_dataset("ptb_text_only", "penn_treebank", split="train")
        val = _load_dataset("ptb_text_only", "penn_treebank", split="validation")
        calib, ev = "\n\n".join(train["sentence"]), "\n\n".join(val["sentence"])
        split, src = "train split calibrates, validation split evaluates", "ptb_text_only (datasets)"
    elif name == "c4":  # datautils.get_c4: first train shard, first validation shard
        train = _load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
        )
        val = _load_dataset(
            "allenai/c4",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation",
        )
        c4_docs = (train["text"], val["text"])
        calib, ev = "", ""  # c4 windows come from individual documents
        split = "train shard 0 calibrates, validation shard 0 evaluates (256 random windows, seed 0)"
        src = "allenai/c4 en (datasets)"
    else:  # pragma: no cover
        raise CorpusError(name)
    h = hashlib.sha256()
    for part in [calib, ev] if c4_docs is None else [*c4_docs[0][:1000], *c4_docs[1][:1000]]:
        h.update(part.encode("utf-8"))
    info = CorpusInfo(name, src, h.hexdigest(), py, len(calib) + len(ev), len(calib), len(ev), split)
    return _Parts(info, calib, ev, paper=True, c4_docs=c4_docs)


@lru_cache(maxsize=8)
def _parts_cached(name: str, mtime: float | None) -> _Parts:
    return _paper_parts(name) if name in PAPER_DATASETS else _local_parts(name)


def _parts(name: str | os.PathLike) -> _Parts:
    name = os.fspath(name)
    mtime = None
    if name not in CORPORA:
        try:
            mtime = Path(name).expanduser().stat().st_mtime  # re-read a user's file when it changes
        except OSError:
            pass
    return _parts_cached(name, mtime)


def load_corpus(name: str | os.PathLike) -> str:
    """The full text of a corpus (calibration part + evaluation part). See the module doc for names."""
    p = _parts(name)
    if p.c4_docs is not None:
        return "\n\n".join(p.c4_docs[1])
    if p.paper:
        return p.calib + "\n\n" + p.eval
    return p.calib + p.eval


def corpus_info(name: str | os.PathLike) -> CorpusInfo:
    """Provenance for reports: source, sha256 of the text, Python version, split sizes."""
    return _parts(name).info


def corpus_parts(name: str | os.PathLike) -> tuple[str, str]:
    """(calibration text, evaluation text); they never overlap."""
    p = _parts(name)
    return p.calib, p.eval


# ---------------------------------------------------------------------------------------------------------
# tokens

_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode(tokenizer, text: str, paper: bool) -> torch.Tensor:
    """Token ids of a text as a 1-D LongTensor, memoised per tokenizer (tokenizing the code corpus takes
    seconds). Local corpora: no special tokens; paper datasets: the tokenizer's default (the paper's code
    calls tokenizer(text), which adds BOS for OPT/LLaMA)."""
    try:
        memo = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        memo = {}
    key = (_sha(text), paper)
    if key not in memo:
        enc = tokenizer(text, add_special_tokens=paper, verbose=False)["input_ids"]
        memo[key] = torch.tensor(enc, dtype=torch.long)
    return memo[key]


def calibration_ids(tokenizer, corpus) -> torch.Tensor:
    """The calibration part of a corpus as one token stream (1-D)."""
    p = _parts(corpus)
    return _encode(tokenizer, p.calib, p.paper)


def calibration_windows(
    tokenizer, corpus, nsamples: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """nsamples random windows of seqlen tokens from the calibration part, as a LongTensor
    (nsamples, seqlen). The same seed gives the same windows (the paper's sampler: random.seed(seed),
    start = randint(0, N - seqlen - 1)). Windows may overlap each other, never the evaluation part."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive (got nsamples={nsamples}, seqlen={seqlen})")
    p = _parts(corpus)
    rng = random.Random(seed)
    if p.c4_docs is not None:
        return _c4_windows(tokenizer, p.c4_docs[0], nsamples, seqlen, rng)
    ids = _encode(tokenizer, p.calib, p.paper)
    n = ids.numel()
    if n < seqlen + 1:
        raise ValueError(
            f"the calibration part of corpus '{p.info.name}' has {n} tokens "
            f"({p.info.calib_chars} characters), fewer than one window of seqlen={seqlen} + 1. "
            "Use a shorter seqlen or a longer text "
            f"(it needs about {int((seqlen + 1) / max(n, 1) * p.info.chars) + 1} characters in all)."
        )
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _c4_windows(tokenizer, docs, nsamples, seqlen, rng) -> torch.Tensor:
    # datautils.get_c4: draw documents until one is long enough, then a random window of it
    out = []
    for _ in range(nsamples):
        while True:
            enc = _encode_doc(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if enc.numel() > seqlen:
                break
        s = rng.randint(0, enc.numel() - seqlen - 1)
        out.append(enc[s : s + seqlen])
    return torch.stack(out)


def _encode_doc(tokenizer, text):
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def _encode_prefix(tokenizer, text: str, n_tokens: int, margin: int = 256) -> torch.Tensor:
    """The first n_tokens of text's tokens without tokenizing all of it (the code corpus has 2.7M
    characters of evaluation text). Tokenizers are local: a prefix cut at a line break tokenizes like the
    full text except for the last few tokens, so we keep `margin` tokens in reserve and grow the prefix
    until it has n_tokens + margin. Falls back to the whole text."""
    chars = max(4096, 6 * (n_tokens + margin))
    while chars < len(text):
        cut = text.find("\n", chars)
        if cut < 0:
            break
        ids = _encode(tokenizer, text[: cut + 1], False)
        if ids.numel() >= n_tokens + margin:
            return ids[: n_tokens + margin]
        chars *= 2
    return _encode(tokenizer, text, False)


def evaluation_ids(tokenizer, corpus, n_tokens: int | None = None, seqlen: int | None = None) -> torch.Tensor:
    """The held-out token stream (1-D LongTensor): the first n_tokens of the evaluation part (all of it if
    None). For "c4" it is the paper's 256 windows of `seqlen` (default 2048) from the validation shard.
    Raises ValueError with the numbers when the evaluation part is too short."""
    p = _parts(corpus)
    if p.c4_docs is not None:
        sl = seqlen or 2048
        ids = _c4_windows(tokenizer, p.c4_docs[1], 256, sl, random.Random(0)).reshape(-1)
    elif n_tokens is not None and not p.paper:
        ids = _encode_prefix(tokenizer, p.eval, n_tokens)
    else:
        ids = _encode(tokenizer, p.eval, p.paper)
    n = ids.numel()
    if seqlen is not None and n < seqlen:
        raise ValueError(
            f"the evaluation part of corpus '{p.info.name}' has {n} tokens, fewer than one window "
            f"of seqlen={seqlen}. Use a shorter seqlen or a longer text."
        )
    if n_tokens is not None:
        if n_tokens > n:
            raise ValueError(
                f"asked for {n_tokens} evaluation tokens but the evaluation part of corpus "
                f"'{p.info.name}' has only {n}. Ask for at most {n}, or n_tokens=None for all."
            )
        ids = ids[:n_tokens]
    return ids
