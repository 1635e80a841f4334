"""Task registry (GLUE, commonsense reasoning, local files) and seeded train/val/test loading."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tspeft.data.bundled import BundledDataMissing, bundled_available, read_bundled

DATASETS_INSTALL_HINT = "pip install datasets"


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a task: where its data lives, how it is scored, which fields hold text."""

    name: str
    family: str  # "glue" | "csr" | "local"
    metrics: tuple[str, ...]  # primary metric first
    num_labels: int  # 1 for regression; number of choices (max) for multiple-choice CSR tasks
    text_fields: tuple[str, ...]
    is_regression: bool = False
    label_field: str = "label"
    hub_id: str | None = None
    hub_config: str | None = None
    hub_train_split: str = "train"
    hub_test_split: str = "validation"
    hub_revision: str | None = None  # e.g. the hub's Parquet export of a dataset that still ships a loading script
    bundled_path: str | None = None
    display: str = ""  # human-readable source name used in notes
    label_names: tuple[str, ...] = ()  # for local files with string labels

    @property
    def primary_metric(self) -> str:
        """Return the name of the metric the paper's tables report first."""
        return self.metrics[0]

    @property
    def is_multiple_choice(self) -> bool:
        """Return True for CSR tasks normalised to {context, question, choices, label} records."""
        return self.family == "csr"


@dataclass
class TaskData:
    """A loaded task: its spec, seeded train/val/test record lists and a note to print with every score."""

    spec: TaskSpec
    train: list[dict]
    test: list[dict]
    val: list[dict] = field(default_factory=list)
    note: str = ""

    def __repr__(self) -> str:
        return f"TaskData({self.note})"


def _glue(name: str, fields: tuple[str, ...], metrics: tuple[str, ...], num_labels: int = 2,
          bundled: bool = False, regression: bool = False, test_split: str = "validation") -> TaskSpec:
    return TaskSpec(
        name=name, family="glue", metrics=metrics, num_labels=num_labels, text_fields=fields,
        is_regression=regression, hub_id="nyu-mll/glue", hub_config=name, hub_test_split=test_split,
        bundled_path=f"glue/{name}/validation" if bundled else None, display="GLUE",
    )


def _csr(name: str, hub_id: str, hub_config: str | None, bundled: str, display: str, choices: int,
         test_split: str = "validation", revision: str | None = None) -> TaskSpec:
    return TaskSpec(
        name=name, family="csr", metrics=("accuracy",), num_labels=choices,
        text_fields=("context", "question", "choices"), hub_id=hub_id, hub_config=hub_config,
        hub_test_split=test_split, hub_revision=revision, bundled_path=bundled, display=display,
    )


# STS-B: Pearson is primary (the column reported by the LoRA/DeBERTa GLUE tables); Spearman is also returned.
# Commonsense from the hub: the evaluation splits of the DoRA / LLM-Adapters tables (test for ARC and OBQA,
# validation for the others, whose test labels are hidden). PIQA and Social IQa ship loading scripts, which
# `datasets` >= 4 refuses: PIQA is read from the hub's Parquet export of the same repository (config
# "default" there), Social IQa from lighteval/siqa, a script-less copy with the same rows and columns.
_SPECS: tuple[TaskSpec, ...] = (
    _glue("cola", ("sentence",), ("matthews",)),
    _glue("sst2", ("sentence",), ("accuracy",), bundled=True),
    _glue("mrpc", ("sentence1", "sentence2"), ("accuracy", "f1"), bundled=True),
    _glue("qqp", ("question1", "question2"), ("accuracy", "f1")),
    _glue("stsb", ("sentence1", "sentence2"), ("pearson", "spearman"), num_labels=1, regression=True),
    _glue("mnli", ("premise", "hypothesis"), ("accuracy",), num_labels=3, test_split="validation_matched"),
    _glue("qnli", ("question", "sentence"), ("accuracy",)),
    _glue("rte", ("sentence1", "sentence2"), ("accuracy",), bundled=True),
    _csr("boolq", "google/boolq", None, "boolq/none/validation", "BoolQ", 2),
    _csr("piqa", "ybisk/piqa", "default", "piqa/plain_text/validation", "PIQA", 2, revision="refs/convert/parquet"),
    _csr("siqa", "lighteval/siqa", None, "social_i_qa/none/validation", "Social IQa", 3),
    _csr("hellaswag", "Rowan/hellaswag", None, "hellaswag/none/validation", "HellaSwag", 4),
    _csr("winogrande", "allenai/winogrande", "winogrande_xl", "winogrande/winogrande_xl/validation",
         "WinoGrande (xl)", 2),
    _csr("obqa", "allenai/openbookqa", "main", "openbookqa/main/validation", "OpenBookQA", 4, test_split="test"),
    _csr("arc_e", "allenai/ai2_arc", "ARC-Easy", "ai2_arc/ARC-Easy/validation", "ARC-Easy", 4, test_split="test"),
    _csr("arc_c", "allenai/ai2_arc", "ARC-Challenge", "ai2_arc/ARC-Challenge/validation", "ARC-Challenge", 4,
         test_split="test"),
    TaskSpec(name="local", family="local", metrics=("accuracy",), num_labels=2, text_fields=("sentence",),
             display="local files"),
)
TASKS: dict[str, TaskSpec] = {s.name: s for s in _SPECS}
GLUE_TASKS = tuple(s.name for s in _SPECS if s.family == "glue")
CSR_TASKS = tuple(s.name for s in _SPECS if s.family == "csr")


def list_tasks() -> list[str]:
    """Return the names of all registered tasks (GLUE, then CSR, then 'local')."""
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    """Return the TaskSpec registered under ``name`` (case-insensitive)."""
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


# ---------------------------------------------------------------------------------------------- normalising rows


def _letter_index(keys: Sequence[str], key: str) -> int:
    return list(keys).index(str(key).strip())


def _clean_hellaswag(text: str) -> str:
    text = text.replace(" [title]", ". ").strip()
    while "[" in text and "]" in text[text.index("["):]:
        start = text.index("[")
        text = text[:start] + text[text.index("]", start) + 1:]
    return " ".join(text.split())


def _mc(context: str, question: str, choices: Sequence[str], label: int) -> dict:
    return {"context": context.strip(), "question": question.strip(), "choices": [c.strip() for c in choices],
            "label": int(label)}


_NORMALISERS: dict[str, Callable[[dict], dict]] = {
    "boolq": lambda r: _mc(r["passage"], r["question"], ["false", "true"], int(bool(r["answer"]))),
    "piqa": lambda r: _mc("", r["goal"], [r["sol1"], r["sol2"]], r["label"]),
    "siqa": lambda r: _mc(r["context"], r["question"], [r["answerA"], r["answerB"], r["answerC"]],
                          int(r["label"]) - 1),
    "hellaswag": lambda r: _mc(
        _clean_hellaswag(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"), "",
        [_clean_hellaswag(e) for e in r["endings"]], int(r["label"])),
    "winogrande": lambda r: _mc("", r["sentence"], [r["option1"], r["option2"]], int(r["answer"]) - 1),
    "obqa": lambda r: _mc("", r["question_stem"], r["choices"]["text"],
                          _letter_index(r["choices"]["label"], r["answerKey"])),
    "arc_e": lambda r: _mc("", r["question"], r["choices"]["text"],
                           _letter_index(r["choices"]["label"], r["answerKey"])),
}
_NORMALISERS["arc_c"] = _NORMALISERS["arc_e"]


def normalise(spec: TaskSpec, row: dict) -> dict:
    """Return ``row`` in the task's common record layout (GLUE: text fields + label; CSR: multiple choice)."""
    if spec.family == "csr":
        return _NORMALISERS[spec.name](row)
    rec = {f: row[f] for f in spec.text_fields}
    rec["label"] = float(row[spec.label_field]) if spec.is_regression else int(row[spec.label_field])
    return rec


# ---------------------------------------------------------------------------------------------------- splitting


def _check_fraction(name: str, value: float, upper_inclusive: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _cap(rows: list[dict], cap: int | None, name: str) -> list[dict]:
    if cap is None:
        return rows
    if cap < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {cap}")
    return rows[:cap]


def _carve(rows: list[dict], fraction: float, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Return (rest, carved) with ``fraction`` of the rows carved out after a seeded shuffle."""
    order = rng.permutation(len(rows))
    n = int(round(len(rows) * fraction))
    if fraction > 0 and len(rows) > 1:
        n = min(max(n, 1), len(rows) - 1)
    carved = [rows[i] for i in order[:n]]
    rest = [rows[i] for i in order[n:]]
    return rest, carved


def _sizes_note(train: list, test: list, val: list, full_train: int, full_test: int) -> str:
    text = f"{len(train)} train / {len(test)} test"
    if val:
        text += f" / {len(val)} val"
    caps = [f"{kind} {full} -> {len(kept)}" for kind, full, kept in (("train", full_train, train),
                                                                     ("test", full_test, test))
            if full != len(kept)]
    if caps:
        text += f" (capped by max_train/max_test: {', '.join(caps)})"
    return text


# ------------------------------------------------------------------------------------------------------ sources


def _from_hub(spec: TaskSpec, split: str) -> list[dict]:
    try:
        import datasets  # optional dependency, only needed on this path
    except ImportError as err:
        raise ImportError(
            f"loading {spec.name!r} from the hub needs the 'datasets' package: `{DATASETS_INSTALL_HINT}` "
            f"(or use the bundled offline data where available: {', '.join(bundled_task_names())})"
        ) from err
    extra = {"revision": spec.hub_revision} if spec.hub_revision else {}
    ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split, **extra)
    return [dict(r) for r in ds]


def bundled_task_names() -> list[str]:
    """Return the tasks that have a bundled offline split."""
    return [s.name for s in _SPECS if s.bundled_path]


def _resolve_source(spec: TaskSpec, source: str) -> str:
    if source not in ("auto", "bundled", "hub"):
        raise ValueError(f"source must be 'auto', 'bundled' or 'hub', got {source!r}")
    if source == "bundled" and spec.bundled_path is None:
        raise ValueError(f"task {spec.name!r} has no bundled offline data; use source='hub' "
                         f"(needs network and `{DATASETS_INSTALL_HINT}`). Bundled tasks: "
                         f"{', '.join(bundled_task_names())}")
    if source == "auto":
        return "bundled" if spec.bundled_path and bundled_available(spec.bundled_path) else "hub"
    return source


def load_task(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    val_fraction: float = 0.0,
    max_train: int | None = None,
    max_test: int | None = None,
    source: str = "auto",
    data_files: dict[str, str | Path] | None = None,
    text_fields: Sequence[str] | None = None,
    label_field: str | None = None,
) -> TaskData:
    """Return a TaskData with seeded train/val/test record lists and a provenance note.

    Bundled data only has validation splits, so those are split into train/test with ``seed``
    (``test_fraction`` goes to test). From the hub, the official train split and the task's
    evaluation split (validation; validation_matched for MNLI) are used. ``val_fraction`` of train
    is carved out for hyper-parameter selection. ``max_train``/``max_test`` keep the first rows after
    the seeded shuffle, so a given seed always gives the same subset.
    """
    spec = get_task(name)
    _check_fraction("val_fraction", val_fraction)
    if spec.family == "local":
        spec, train_rows, test_rows, val_rows, origin = _load_local(
            spec, data_files, text_fields=text_fields, label_field=label_field)
    else:
        if data_files is not None or text_fields is not None or label_field is not None:
            raise ValueError("data_files / text_fields / label_field only apply to load_task('local', ...)")
        resolved = _resolve_source(spec, source)
        val_rows = []
        if resolved == "bundled":
            try:
                raw = read_bundled(spec.bundled_path)
            except BundledDataMissing as err:
                raise BundledDataMissing(f"{err} (task {spec.name!r})") from err
            rows = [normalise(spec, r) for r in raw]
            origin = f"bundled {spec.display} validation split ({len(rows)} rows)"
            train_rows, test_rows = rows, None
        else:
            train_rows = [normalise(spec, r) for r in _from_hub(spec, spec.hub_train_split)]
            test_rows = [normalise(spec, r) for r in _from_hub(spec, spec.hub_test_split)]
            origin = (f"hub {spec.hub_id}{'/' + spec.hub_config if spec.hub_config else ''} "
                      f"{spec.hub_train_split} ({len(train_rows)} rows) / {spec.hub_test_split} "
                      f"({len(test_rows)} rows)")
    return _split(spec, train_rows, test_rows, val_rows, origin, seed=seed, test_fraction=test_fraction,
                  val_fraction=val_fraction, max_train=max_train, max_test=max_test)


def _split(spec: TaskSpec, train_rows: list[dict], test_rows: list[dict] | None, val_rows: list[dict],
           origin: str, *, seed: int, test_fraction: float, val_fraction: float,
           max_train: int | None, max_test: int | None) -> TaskData:
    rng = np.random.default_rng(seed)
    if test_rows is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1) when the test set is carved out, got {test_fraction}")
        if len(train_rows) < 2:
            raise ValueError(f"{spec.name}: need at least 2 rows to split into train and test, got {len(train_rows)}")
        train_rows, test_rows = _carve(train_rows, test_fraction, rng)
        how = f"seeded split {seed} into"
    else:
        test_rows = [test_rows[i] for i in rng.permutation(len(test_rows))]
        train_rows = [train_rows[i] for i in rng.permutation(len(train_rows))]
        how = f"shuffled with seed {seed}:"
    if val_fraction > 0 and not val_rows:
        train_rows, val_rows = _carve(train_rows, val_fraction, rng)
    train = _cap(train_rows, max_train, "max_train")
    test = _cap(test_rows, max_test, "max_test")
    sizes = _sizes_note(train, test, val_rows, len(train_rows), len(test_rows))
    note = f"{spec.name}: {origin}, {how} {sizes}"
    return TaskData(spec=spec, train=train, test=test, val=val_rows, note=note)


# -------------------------------------------------------------------------------------------------- local files


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Return (rows, column names) of a CSV/TSV or JSON-lines/JSON file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [dict(r) for r in reader]
            columns = list(reader.fieldnames or [])
    elif suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8").strip()
        if suffix == ".json" and text.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: every JSON record must be an object with named fields")
        columns = list(dict.fromkeys(k for r in rows for k in r))
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .json")
    if not rows:
        raise ValueError(f"{path} contains no rows (an empty dataset); add examples with a text and a label")
    return rows, columns


def _default_text_fields(columns: list[str], path: Path) -> tuple[str, ...]:
    for candidate in (("sentence1", "sentence2"), ("sentence",), ("text",)):
        if all(c in columns for c in candidate):
            return candidate
    raise ValueError(f"{path}: cannot guess the text column(s); pass text_fields=(...) (--text-fields on the "
                     f"command line) from the columns that exist: {columns}")


def _check_columns(path: Path, columns: list[str], needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{path}: {what} column(s) {missing} not found; columns that exist: {columns}")


def _label_mapping(values: list) -> tuple[str, dict | None, tuple[str, ...]]:
    """Return (kind, mapping, names): kind is 'int', 'float' or 'names'."""
    def as_number(v):
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int | float):
            return v
        try:
            return float(str(v).strip())
        except ValueError:
            return None

    numbers = [as_number(v) for v in values]
    if all(n is not None for n in numbers):
        if all(float(n).is_integer() for n in numbers):
            if min(numbers) < 0:
                raise ValueError(f"integer labels must be 0..K-1, found {int(min(numbers))}")
            return "int", None, ()
        return "float", None, ()
    names = tuple(sorted({str(v).strip() for v in values}))
    return "names", {n: i for i, n in enumerate(names)}, names


def _load_local(template: TaskSpec, data_files, *, text_fields, label_field):
    if not data_files:
        raise ValueError("load_task('local') needs data_files={'train': path} (optionally 'test' and "
                         "'validation'), each a .csv, .tsv, .jsonl or .json file")
    if isinstance(data_files, str | Path):
        data_files = {"train": data_files}
    unknown = set(data_files) - {"train", "test", "validation", "val"}
    if unknown or "train" not in data_files:
        raise ValueError(f"data_files keys must include 'train' and may include 'test' and 'validation'; "
                         f"got {sorted(data_files)}")
    label_field = label_field or "label"
    loaded: dict[str, tuple[Path, list[dict]]] = {}
    for split, file in data_files.items():
        path = Path(file)
        rows, columns = _read_rows(path)
        if text_fields is None:
            text_fields = _default_text_fields(columns, path)
        text_fields = tuple([text_fields] if isinstance(text_fields, str) else text_fields)
        _check_columns(path, columns, text_fields, "text")
        _check_columns(path, columns, [label_field], "label")
        for i, r in enumerate(rows):
            if r.get(label_field) in (None, ""):
                raise ValueError(f"{path}: row {i} has an empty {label_field!r}; every row needs a label")
        loaded["validation" if split == "val" else split] = (path, rows)

    all_labels = [r[label_field] for _, rows in loaded.values() for r in rows]
    kind, mapping, names = _label_mapping(all_labels)
    if kind == "float":
        num_labels, metrics = 1, ("pearson", "spearman")
    else:
        num_labels = len(names) if kind == "names" else int(max(float(v) for v in all_labels)) + 1
        num_labels = max(num_labels, 2)
        metrics = ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    spec = replace(template, text_fields=text_fields, label_field=label_field, num_labels=num_labels,
                   is_regression=kind == "float", metrics=metrics, label_names=names)

    def convert(row: dict) -> dict:
        rec = {f: "" if row[f] is None else str(row[f]) for f in text_fields}
        value = row[label_field]
        if kind == "names":
            rec["label"] = mapping[str(value).strip()]
        elif kind == "float":
            rec["label"] = float(value)
        else:
            rec["label"] = int(float(value))
        return rec

    parts = {split: [convert(r) for r in rows] for split, (_, rows) in loaded.items()}
    origin = ", ".join(f"{split}={path} ({len(rows)} rows)" for split, (path, rows) in loaded.items())
    origin = f"local files {origin}"
    if names:
        origin += f", labels {dict(mapping)}"
    return spec, parts["train"], parts.get("test"), parts.get("validation", []), origin
