"""Data: offline and paper corpora, deterministic calibration windows, held-out evaluation tokens."""

from .corpora import (
    CALIB_FRACTION,
    CORPORA,
    CorpusError,
    CorpusInfo,
    calibration_ids,
    calibration_windows,
    corpus_info,
    corpus_parts,
    evaluation_ids,
    load_corpus,
)

__all__ = [
    "CALIB_FRACTION",
    "CORPORA",
    "CorpusError",
    "CorpusInfo",
    "calibration_ids",
    "calibration_windows",
    "corpus_info",
    "corpus_parts",
    "evaluation_ids",
    "load_corpus",
]
