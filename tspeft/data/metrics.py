"""Task metrics implemented with numpy: accuracy, binary F1, Matthews correlation, Pearson, Spearman."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tspeft.data.tasks import TaskSpec

ArrayLike = Sequence | np.ndarray


def _pair(predictions: ArrayLike, labels: ArrayLike, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predictions, dtype=dtype).reshape(-1)
    y = np.asarray(labels, dtype=dtype).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Return the fraction of predictions equal to the labels (0..1)."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Return binary F1 with class 1 as positive (0..1); 0 when there are no true positives."""
    p, y = _pair(predictions, labels)
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y != 1)))
    fn = float(np.sum((p != 1) & (y == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Return the (multi-class) Matthews correlation coefficient (-1..1); 0 when undefined."""
    p, y = _pair(predictions, labels)
    classes = np.unique(np.concatenate([p, y]))
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for yi, pi in zip(y, p):
        cm[index[yi], index[pi]] += 1
    t = cm.sum(axis=1)  # true counts per class
    q = cm.sum(axis=0)  # predicted counts per class
    c, s = np.trace(cm), cm.sum()
    denom = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return 0.0 if denom == 0 else float((c * s - t @ q) / denom)


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Return the Pearson correlation (-1..1); defined as 0 when either input is constant."""
    p, y = _pair(predictions, labels, dtype=np.float64)
    pc, yc = p - p.mean(), y - y.mean()
    denom = np.sqrt((pc @ pc) * (yc @ yc))
    return 0.0 if denom == 0 else float((pc @ yc) / denom)


def rankdata(values: ArrayLike) -> np.ndarray:
    """Return 1-based ranks of ``values``, ties getting the average of the ranks they span."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    start = 0
    while start < x.size:
        end = start
        while end + 1 < x.size and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Return the Spearman rank correlation (-1..1), average ranks for ties; 0 when undefined."""
    p, y = _pair(predictions, labels, dtype=np.float64)
    return pearson(rankdata(p), rankdata(y))


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def primary_metric(spec: TaskSpec) -> str:
    """Return the name of the task's headline metric (the first in ``spec.metrics``)."""
    return spec.metrics[0]


def to_predictions(spec: TaskSpec, outputs: ArrayLike) -> np.ndarray:
    """Return class ids (argmax of logits) or regression values (squeezed) from model outputs or ids."""
    arr = np.asarray(outputs)
    if spec.is_regression:
        return arr.reshape(-1).astype(np.float64)
    if arr.ndim == 2:
        return arr.argmax(axis=-1)
    return arr.reshape(-1)


def compute_metrics(spec: TaskSpec, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Return every metric of the task in percent (0-100), primary first; accepts ids or logits."""
    preds = to_predictions(spec, predictions)
    return {name: 100.0 * METRICS[name](preds, labels) for name in spec.metrics}
