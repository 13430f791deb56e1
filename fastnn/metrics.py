"""Classification metrics without scikit-learn: accuracy, confusion matrix, and a
per-class report formatted like ``sklearn.metrics.classification_report``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastnn._array import to_host

__all__ = [
    "accuracy",
    "classification_report",
    "confusion_matrix",
    "format_confusion_matrix",
    "precision_recall_fscore_support",
]


def _host_labels(a: Any, name: str) -> np.ndarray:
    """1-D int64 NumPy copy of ``a`` (NumPy, CuPy, or a sequence)."""
    arr = to_host(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _host_labels(y_true, "y_true"), _host_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred lengths differ: {t.shape[0]} vs {p.shape[0]}")
    return t, p


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of ``y_pred`` equal to ``y_true`` (both ``(n,)``); 0.0 when n == 0."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p)) if t.size else 0.0


def _resolve_labels(t: np.ndarray, p: np.ndarray, labels: Sequence[int] | None) -> np.ndarray:
    if labels is None:
        return np.union1d(t, p).astype(np.int64)
    out = np.asarray(labels, dtype=np.int64)
    if out.ndim != 1 or out.size == 0:
        raise ValueError("labels must be a non-empty 1-D sequence of ints")
    if np.unique(out).size != out.size:
        raise ValueError(f"labels must be distinct, got {out.tolist()}")
    return out


def confusion_matrix(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> np.ndarray:
    """``(K, K)`` int64 counts: entry ``[i, j]`` = samples of true class ``labels[i]``
    predicted as ``labels[j]``. ``labels`` defaults to the sorted union of both
    inputs; samples whose true or predicted label is not in ``labels`` are ignored."""
    t, p = _pair(y_true, y_pred)
    lab = _resolve_labels(t, p, labels)
    k = lab.size
    # Map labels to row/column indices; -1 marks labels outside ``lab``.
    order = np.argsort(lab)
    sorted_lab = lab[order]

    def index(v: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(sorted_lab, v), 0, k - 1)
        return np.where(sorted_lab[pos] == v, order[pos], -1)

    ti, pi = index(t), index(p)
    keep = (ti >= 0) & (pi >= 0)
    flat = ti[keep] * k + pi[keep]
    return np.bincount(flat, minlength=k * k).reshape(k, k).astype(np.int64)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (sklearn's zero_division=0 result)."""
    out = np.zeros(np.shape(num), dtype=np.float64)
    np.divide(num, den, out=out, where=np.asarray(den) != 0)
    return out


def precision_recall_fscore_support(
    y_true: Any, y_pred: Any, labels: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-label precision, recall, F1 (float64, ``(K,)``) and support (int64, ``(K,)``).

    Undefined ratios (no predictions / no true samples) are 0.0, like sklearn's
    ``zero_division=0``.
    """
    t, p = _pair(y_true, y_pred)
    lab = _resolve_labels(t, p, labels)
    tp = np.array([np.sum((t == c) & (p == c)) for c in lab], dtype=np.float64)
    predicted = np.array([np.sum(p == c) for c in lab], dtype=np.float64)
    support = np.array([np.sum(t == c) for c in lab], dtype=np.int64)
    precision = _div(tp, predicted)
    recall = _div(tp, support.astype(np.float64))
    f1 = _div(2 * precision * recall, precision + recall)
    return precision, recall, f1, support


def classification_report(
    y_true: Any,
    y_pred: Any,
    labels: Sequence[int] | None = None,
    target_names: Sequence[str] | None = None,
    digits: int = 2,
) -> str:
    """Text report like ``sklearn.metrics.classification_report``.

    One row per label (precision, recall, f1-score, support), then ``accuracy``
    (or ``micro avg`` when ``labels`` leaves some classes out), ``macro avg`` and
    ``weighted avg`` (support-weighted) rows. ``y_true``/``y_pred`` are ``(n,)``
    integer class labels (NumPy, CuPy or sequences).
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be a non-negative int, got {digits!r}")
    t, p = _pair(y_true, y_pred)
    lab = _resolve_labels(t, p, labels)
    names = [str(c) for c in lab] if target_names is None else [str(n) for n in target_names]
    if len(names) != lab.size:
        raise ValueError(f"target_names has {len(names)} names for {lab.size} labels")
    precision, recall, f1, support = precision_recall_fscore_support(t, p, lab)

    headers = ["precision", "recall", "f1-score", "support"]
    last_heading = "weighted avg"
    width = max(max(len(n) for n in names), len(last_heading), digits)
    head_fmt = "{:>{width}s} " + " {:>9}" * len(headers)
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    report = head_fmt.format("", *headers, width=width) + "\n\n"
    for row in zip(names, precision, recall, f1, support):
        report += row_fmt.format(*row, width=width, digits=digits)
    report += "\n"

    total = int(support.sum())
    # Accuracy equals micro-averaged F1 only when every seen label is reported.
    present = np.union1d(t, p)
    if np.isin(present, lab).all():
        acc = float(np.mean(t == p)) if t.size else 0.0
        acc_fmt = "{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f}" + " {:>9}\n"
        report += acc_fmt.format("accuracy", "", "", acc, total, width=width, digits=digits)
    else:
        tp = float(np.sum((t == p) & np.isin(t, lab)))
        pred_n = float(np.isin(p, lab).sum())
        micro_p = tp / pred_n if pred_n else 0.0
        micro_r = tp / total if total else 0.0
        micro_f = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
        report += row_fmt.format(
            "micro avg", micro_p, micro_r, micro_f, total, width=width, digits=digits
        )
    report += row_fmt.format(
        "macro avg", precision.mean(), recall.mean(), f1.mean(), total, width=width, digits=digits
    )
    w = support / total if total else np.zeros_like(precision)
    report += row_fmt.format(
        last_heading,
        float(np.sum(precision * w)),
        float(np.sum(recall * w)),
        float(np.sum(f1 * w)),
        total,
        width=width,
        digits=digits,
    )
    return report


def format_confusion_matrix(cm: np.ndarray, target_names: Sequence[str] | None = None) -> str:
    """Render a ``(K, K)`` confusion matrix: rows are true labels, columns predicted."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square 2-D matrix, got shape {cm.shape}")
    k = cm.shape[0]
    names = [str(i) for i in range(k)] if target_names is None else [str(n) for n in target_names]
    if len(names) != k:
        raise ValueError(f"target_names has {len(names)} names for a {k}x{k} matrix")
    cell = max([len(str(int(v))) for v in cm.ravel()] + [len(n) for n in names] + [1])
    corner = "true\\pred"
    label_w = max(len(corner), max((len(n) for n in names), default=0))
    lines = [f"{corner:>{label_w}} " + " ".join(f"{n:>{cell}}" for n in names)]
    for name, row in zip(names, cm):
        lines.append(f"{name:>{label_w}} " + " ".join(f"{int(v):>{cell}}" for v in row))
    return "\n".join(lines) + "\n"
