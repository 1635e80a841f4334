"""Recipes: the paper's Table 6 (with Table 1-3's lambda and s) and our small-scale settings, as JSON.

A recipe file has ``defaults``, then per-``tasks``, per-``methods`` and per-``task_methods`` overrides,
merged in that order; command-line flags override any field.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

RECIPES = ("small", "nlu", "csr", "vit")
RECIPE_HELP = (
    "settings to start from: small (bundled MiniLM, tuned for CPU), nlu / csr / vit (the paper's Table 6 "
    "with Table 1-3's lambda and s); flags override any field (default: small)"
)


def recipe_data(name: str) -> dict[str, Any]:
    """Return the raw JSON of a recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())


def load_recipe(name: str, task: str | None = None, method: str | None = None) -> dict[str, Any]:
    """Return the merged run settings of recipe `name` for a task and method (None: the recipe's own)."""
    data = recipe_data(name)
    out: dict[str, Any] = dict(data.get("defaults", {}))
    task = task or out.get("task")
    method = method or out.get("method")
    out.update(data.get("tasks", {}).get(task, {}))
    out.update(data.get("methods", {}).get(method, {}))
    out.update(data.get("task_methods", {}).get(task, {}).get(method, {}))
    return out
