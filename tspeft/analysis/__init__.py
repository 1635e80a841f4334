"""Analysis of finished runs: Table 5 / Tables 1–4, pictures, module selection (§4.3) and an HTML report.

Reads run directories written by training (``run.json``, ``log.jsonl``, optional ``ratios.npz``); needs
neither torch nor a model.
"""

from .plots import (
    ablation_plot,
    ratio_distribution,
    selection_curve,
    sparsity_heatmap,
    threshold_trajectories,
)
from .report import write_report
from .runs import ModuleStats, Run, load_run, method_label, parse_module_name, run_from_meta
from .select import (
    STRATEGIES,
    Selection,
    cumulative_order,
    select_modules,
    selection_command,
    selection_config,
)
from .tables import Grid, SparsityTable, compare_grid, compare_table, sparsity_table, table4_grid

__all__ = [
    "STRATEGIES",
    "Grid",
    "ModuleStats",
    "Run",
    "Selection",
    "SparsityTable",
    "ablation_plot",
    "compare_grid",
    "compare_table",
    "cumulative_order",
    "load_run",
    "method_label",
    "parse_module_name",
    "ratio_distribution",
    "run_from_meta",
    "select_modules",
    "selection_command",
    "selection_config",
    "selection_curve",
    "sparsity_heatmap",
    "sparsity_table",
    "table4_grid",
    "threshold_trajectories",
    "write_report",
]
