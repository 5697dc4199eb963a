"""Evaluation: held-out visual QA exact match, caption loss, text bits per byte, and the report card."""

from ghostvis.eval.losses import caption_loss, text_bpb
from ghostvis.eval.report import read_metrics, write_report
from ghostvis.eval.vqa import WrongCheckpoint, evaluate_vqa
from ghostvis.tasks.qa import normalize_answer

__all__ = ["WrongCheckpoint", "caption_loss", "evaluate_vqa", "normalize_answer", "read_metrics", "text_bpb",
           "write_report"]
