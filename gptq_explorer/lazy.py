"""Names a package imports on first access (PEP 562): `__getattr__ = lazy.names(__name__, {name: submodule})`.

The app's first view and the Voila server need little of the package; torch alone is slow to import
(see gptq_explorer.lazy_torch and docs/performance.md). A name is imported from its submodule the first
time it is asked for and then kept on the package like an ordinary attribute."""

from __future__ import annotations

import importlib
import sys


def names(package: str, table: dict[str, str]):
    """A module-level __getattr__ for `package` serving table's names (name -> submodule, relative)."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
