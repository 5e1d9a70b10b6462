"""Evaluation: data set readers, transcript metrics (WER/CER, degeneration) and report writers."""

from audiokv_cli.evaluation.datasets import DatasetError, Example, detect_layout, load_dataset
from audiokv_cli.evaluation.metrics import (
    accuracy,
    aggregate,
    clip_cer,
    clip_wer,
    corpus_cer,
    corpus_wer,
    is_degenerate,
    normalize,
    score_clip,
)
from audiokv_cli.evaluation.report import markdown_table, plot_retention, table1, write_report

__all__ = [
    "DatasetError",
    "Example",
    "accuracy",
    "aggregate",
    "clip_cer",
    "clip_wer",
    "corpus_cer",
    "corpus_wer",
    "detect_layout",
    "is_degenerate",
    "load_dataset",
    "markdown_table",
    "normalize",
    "plot_retention",
    "score_clip",
    "table1",
    "write_report",
]
