"""Tasks, offline data, metrics and input formatting for TS-PEFT experiments."""

from tspeft.data.bundled import BUNDLE_INSTALL_HINT, BundledDataMissing, bundled_available, bundled_root
from tspeft.data.formatting import (
    HEADS,
    IGNORE_INDEX,
    answer_texts,
    build_prompt,
    collate,
    encode_examples,
    head_for,
    num_choices,
    score_choices,
)
from tspeft.data.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    primary_metric,
    spearman,
)
from tspeft.data.tasks import (
    CSR_TASKS,
    GLUE_TASKS,
    TaskData,
    TaskSpec,
    bundled_task_names,
    get_task,
    list_tasks,
    load_task,
)

__all__ = [
    "BUNDLE_INSTALL_HINT",
    "BundledDataMissing",
    "CSR_TASKS",
    "GLUE_TASKS",
    "HEADS",
    "IGNORE_INDEX",
    "TaskData",
    "TaskSpec",
    "accuracy",
    "answer_texts",
    "build_prompt",
    "bundled_available",
    "bundled_root",
    "bundled_task_names",
    "collate",
    "compute_metrics",
    "encode_examples",
    "f1",
    "get_task",
    "head_for",
    "list_tasks",
    "load_task",
    "matthews_corrcoef",
    "num_choices",
    "pearson",
    "primary_metric",
    "score_choices",
    "spearman",
]
