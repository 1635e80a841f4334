"""Turn task records into model inputs: encoder classification / multiple choice, and causal-LM prompts."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from tspeft.data.tasks import TaskSpec

HEADS = ("sequence-classification", "multiple-choice", "causal-lm")
MODEL_KINDS = ("encoder", "causal-lm", "vision-language")
IGNORE_INDEX = -100
_UNBOUNDED = 1_000_000  # tokenizers without a known limit report a huge model_max_length


def head_for(spec: TaskSpec, model_kind: str) -> str:
    """Return the head a task needs on a model kind: 'sequence-classification', 'multiple-choice' or 'causal-lm'."""
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {model_kind!r}; expected one of {MODEL_KINDS}")
    if spec.family != "csr":
        return "sequence-classification"
    if model_kind != "encoder":
        return "causal-lm"
    return "sequence-classification" if spec.name == "boolq" else "multiple-choice"


def num_choices(spec: TaskSpec, records: Sequence[dict] | None = None) -> int | None:
    """Return the (maximum) number of answer choices of a multiple-choice task, else None."""
    if spec.family != "csr":
        return None
    if records:
        return max(len(r["choices"]) for r in records)
    return spec.num_labels


def clamp_max_length(tokenizer, max_length: int, model_max_length: int | None = None) -> int:
    """Return ``max_length`` clamped to the tokenizer's / model's limit, warning when it was lowered."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), model_max_length)
              if isinstance(n, int) and 0 < n < _UNBOUNDED]
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    if limits and max_length > min(limits):
        warnings.warn(f"max_length={max_length} exceeds the model's limit of {min(limits)} tokens; "
                      f"using {min(limits)}", stacklevel=3)
        return min(limits)
    return max_length


def context_limit(model, tokenizer, at_least: int, fallback: int = 2048) -> int:
    """Return the longest sequence the model and tokenizer take (for scoring whole prompts), never below
    ``at_least``; ``fallback`` (or ``at_least``, if larger) when neither states a limit."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                          getattr(getattr(model, "config", None), "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < _UNBOUNDED]
    return max(min(limits), at_least) if limits else max(fallback, at_least)


def _warn_truncated(count: int, total: int, max_length: int, what: str) -> None:
    if count:
        warnings.warn(f"{count} of {total} {what} were longer than max_length={max_length} tokens and were "
                      f"truncated; raise max_length to keep them whole", stacklevel=3)


def _tokenize(tokenizer, first: list[str], second: list[str] | None, max_length: int) -> tuple[dict, int]:
    """Return (batch encoding as python lists, number of truncated sequences)."""
    kwargs = {"add_special_tokens": True, "verbose": False}
    full = tokenizer(first, second, truncation=False, **kwargs) if second else tokenizer(first, **kwargs)
    full = {k: list(v) for k, v in full.items()}
    long_idx = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    if long_idx:
        cut = tokenizer([first[i] for i in long_idx], [second[i] for i in long_idx] if second else None,
                        truncation=True, max_length=max_length, **kwargs)
        for j, i in enumerate(long_idx):
            for key in full:
                full[key][i] = cut[key][j]
    return full, len(long_idx)


def _pair_texts(spec: TaskSpec, record: dict) -> tuple[str, str | None]:
    if spec.family == "csr":
        if spec.name != "boolq":
            raise ValueError(f"task {spec.name!r} is multiple choice: use head='multiple-choice' with an encoder")
        return record["question"], record["context"]
    texts = [str(record[f]) for f in spec.text_fields]
    if len(texts) > 2:
        raise ValueError(f"encoders take one or two text fields, task {spec.name!r} has {spec.text_fields}")
    return texts[0], texts[1] if len(texts) == 2 else None


def _choice_pairs(spec: TaskSpec, record: dict) -> list[tuple[str, str]]:
    """Return one (first, second) text pair per choice for a multiple-choice encoder."""
    question = record["question"]
    if spec.name == "winogrande" and "_" in question:
        cut = question.index("_")
        return [(question[:cut] + choice, question[cut + 1:].strip()) for choice in record["choices"]]
    stem = f"{record['context']} {question}".strip()
    return [(stem, choice) for choice in record["choices"]]


def _label(spec: TaskSpec, record: dict):
    return float(record["label"]) if spec.is_regression else int(record["label"])


def encode_examples(spec: TaskSpec, records: Sequence[dict], tokenizer, max_length: int = 128,
                    head: str | None = None, model_max_length: int | None = None) -> list[dict]:
    """Return one dict of token-id lists (and ``labels``) per record, ready for :func:`collate`.

    sequence-classification: ``input_ids`` etc. are flat lists; multiple-choice: lists of C lists
    (one per choice); causal-lm: prompt + answer ids with ``labels`` -100 on the prompt.
    """
    head = head or head_for(spec, "encoder")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    if not records:
        return []
    max_length = clamp_max_length(tokenizer, max_length, model_max_length)
    if head == "causal-lm":
        return _encode_causal(spec, records, tokenizer, max_length)
    if head == "sequence-classification":
        pairs = [_pair_texts(spec, r) for r in records]
        second = [p[1] for p in pairs] if pairs[0][1] is not None else None
        enc, cut = _tokenize(tokenizer, [p[0] for p in pairs], second, max_length)
        _warn_truncated(cut, len(records), max_length, "sequences")
        return [{**{k: v[i] for k, v in enc.items()}, "labels": _label(spec, r)} for i, r in enumerate(records)]
    if spec.family != "csr":
        raise ValueError(f"task {spec.name!r} is not multiple choice; use head='sequence-classification'")
    per_record = [_choice_pairs(spec, r) for r in records]
    flat = [pair for pairs in per_record for pair in pairs]
    enc, cut = _tokenize(tokenizer, [p[0] for p in flat], [p[1] for p in flat], max_length)
    _warn_truncated(cut, len(flat), max_length, "(question, choice) sequences")
    out, start = [], 0
    for r, pairs in zip(records, per_record):
        stop = start + len(pairs)
        out.append({**{k: v[start:stop] for k, v in enc.items()}, "labels": int(r["label"])})
        start = stop
    return out


# --------------------------------------------------------------------------------------------------- collation


def _as_list(x):
    return x.tolist() if isinstance(x, torch.Tensor | np.ndarray) else x


def _pad_rows(rows: list[list[int]], width: int, value: int) -> list[list[int]]:
    return [list(r) + [value] * (width - len(r)) for r in rows]


def collate(batch: Sequence[dict], pad_token_id: int, *, label_pad_id: int = IGNORE_INDEX,
            return_choice_mask: bool = False) -> dict[str, torch.Tensor]:
    """Return a dict of right-padded tensors: (B, T) for flat examples, (B, C, T) for multiple choice.

    Padding positions get ``pad_token_id`` / attention_mask 0; per-token labels get ``label_pad_id``.
    Multiple-choice examples with fewer choices than the batch maximum get filler rows (pad tokens,
    attention on the first position only); ``return_choice_mask=True`` adds a (B, C) bool
    ``choice_mask`` that is False on those rows (mask their logits before taking the argmax).
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token) first")
    seq_keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch[0]]
    ids = [_as_list(ex["input_ids"]) for ex in batch]
    out: dict[str, torch.Tensor] = {}
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    labels = [_as_list(ex["labels"]) for ex in batch] if "labels" in batch[0] else None
    multiple_choice = bool(ids[0]) and isinstance(ids[0][0], list)
    if multiple_choice:
        n_choices = max(len(x) for x in ids)
        width = max(len(row) for x in ids for row in x)
        for key in seq_keys:
            rows = []
            for ex in batch:
                value = [list(r) for r in _as_list(ex[key])]
                filler = [fill[key]] * width
                if key == "attention_mask":
                    filler = [1] + [0] * (width - 1)
                rows.append(_pad_rows(value, width, fill[key]) + [filler] * (n_choices - len(value)))
            out[key] = torch.tensor(rows, dtype=torch.long)
        if return_choice_mask:
            out["choice_mask"] = torch.tensor([[c < len(x) for c in range(n_choices)] for x in ids])
    else:
        width = max(len(x) for x in ids)
        for key in seq_keys:
            out[key] = torch.tensor(_pad_rows([_as_list(ex[key]) for ex in batch], width, fill[key]),
                                    dtype=torch.long)
    if labels is not None:
        if isinstance(labels[0], list):
            out["labels"] = torch.tensor(_pad_rows(labels, width, label_pad_id), dtype=torch.long)
        elif any(isinstance(v, float) for v in labels):
            out["labels"] = torch.tensor(labels, dtype=torch.float32)
        else:
            out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------ causal-LM prompts

_ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
           "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# task -> (lead sentence, option word); the style of the LLM-Adapters / DoRA commonsense_170k prompts
_STYLES: dict[str, tuple[str, str]] = {
    "piqa": ("Please choose the correct solution to the question:", "Solution"),
    "siqa": ("Please choose the correct answer to the question:", "Answer"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence:", "Ending"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence:",
                   "Option"),
    "obqa": ("Please choose the correct answer to the question:", "Answer"),
    "arc_e": ("Please choose the correct answer to the question:", "Answer"),
    "arc_c": ("Please choose the correct answer to the question:", "Answer"),
}
_DEFAULT_STYLE = ("Please choose the correct answer to the question:", "Answer")


def build_prompt(spec: TaskSpec | None, record: dict) -> str:
    """Return the instruction prompt (Alpaca-wrapped, ending in '### Response:\\n') for a CSR record.

    BoolQ follows the commonsense_170k format, which gives the question without the passage.
    """
    name = spec.name if spec is not None else ""
    if name == "boolq":
        question = record["question"].rstrip("?")
        instruction = (f"Please answer the following question with true or false, question: {question}?"
                       "\n\nAnswer format: true/false")
        return _ALPACA.format(instruction=instruction)
    lead, word = _STYLES.get(name, _DEFAULT_STYLE)
    stem = f"{record['context']} {record['question']}".strip()
    options = "".join(f"\n\n{word}{i + 1}: {c}" for i, c in enumerate(record["choices"]))
    answer_format = "/".join(f"{word.lower()}{i + 1}" for i in range(len(record["choices"])))
    instruction = f"{lead} {stem}{options}\n\nAnswer format: {answer_format}"
    return _ALPACA.format(instruction=instruction)


def answer_texts(spec: TaskSpec | None, record: dict) -> list[str]:
    """Return the target response for each choice, e.g. 'the correct answer is answer2'."""
    name = spec.name if spec is not None else ""
    if name == "boolq":
        return ["the correct answer is false", "the correct answer is true"]
    word = _STYLES.get(name, _DEFAULT_STYLE)[1].lower()
    return [f"the correct answer is {word}{i + 1}" for i in range(len(record["choices"]))]


def _prompt_and_answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer_ids.append(tokenizer.eos_token_id)
    return prompt_ids, answer_ids


def _join(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> tuple[list[int], int, bool]:
    """Return (ids, number of answer tokens, truncated?) keeping the answer and the end of the prompt."""
    answer_ids = answer_ids[: max_length - 1]
    room = max_length - len(answer_ids)
    truncated = len(prompt_ids) > room
    return prompt_ids[-room:] + answer_ids, len(answer_ids), truncated


def _encode_causal(spec: TaskSpec, records: Sequence[dict], tokenizer, max_length: int) -> list[dict]:
    if spec.family != "csr":
        raise ValueError(f"causal-LM prompts exist for the commonsense tasks only, not {spec.name!r}; "
                         "use head='sequence-classification' on the causal LM instead")
    out, cut = [], 0
    for r in records:
        prompt_ids, answer_ids = _prompt_and_answer_ids(tokenizer, build_prompt(spec, r),
                                                        answer_texts(spec, r)[int(r["label"])])
        ids, n_answer, truncated = _join(prompt_ids, answer_ids, max_length)
        cut += truncated
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [IGNORE_INDEX] * (len(ids) - n_answer) + ids[len(ids) - n_answer:]})
    _warn_truncated(cut, len(records), max_length, "prompts")
    return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def score_choices(model, tokenizer, records: Sequence[dict], batch_size: int = 8, *,
                  spec: TaskSpec | None = None, max_length: int = 512) -> list[int]:
    """Return, per record, the index of the choice whose answer has the highest log-likelihood.

    Each (record, choice) continuation is scored as the sum of its token log-probabilities given
    the prompt; ``batch_size`` counts such sequences per forward pass. Pass ``spec`` to use the
    task's own prompt style (the same as training with ``encode_examples(head='causal-lm')``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    items: list[tuple[int, list[int], int]] = []
    cut = 0
    for index, record in enumerate(records):
        prompt = build_prompt(spec, record)
        for answer in answer_texts(spec, record):
            ids, n_answer, truncated = _join(*_prompt_and_answer_ids(tokenizer, prompt, answer), max_length)
            cut += truncated
            items.append((index, ids, n_answer))
    _warn_truncated(cut, len(items), max_length, "scored sequences")
    device, was_training = _model_device(model), model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = max(len(ids) for _, ids, _ in chunk)
            input_ids = torch.tensor(_pad_rows([ids for _, ids, _ in chunk], width, pad_id), device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in chunk],
                                device=device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            for row, (_, ids, n_answer) in enumerate(chunk):
                positions = torch.arange(len(ids) - n_answer - 1, len(ids) - 1, device=device)
                logp = torch.log_softmax(logits[row, positions].float(), dim=-1)
                targets = torch.tensor(ids[len(ids) - n_answer:], device=device)
                scores.append(logp.gather(-1, targets[:, None]).sum().item())
    finally:
        model.train(was_training)
    best: dict[int, tuple[float, int]] = {}
    choice_of: dict[int, int] = {}
    for (index, _, _), score in zip(items, scores):
        choice = choice_of.get(index, 0)
        choice_of[index] = choice + 1
        if index not in best or score > best[index][0]:
            best[index] = (score, choice)
    return [best[i][1] for i in range(len(records))]
