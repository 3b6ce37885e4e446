"""Load a script of ``bench/`` as a module (``bench/`` is not a package of the project)."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from ..conftest import REPO_ROOT


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as the module ``phoenix_bench_<name>``."""
    path = os.path.join(REPO_ROOT, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"phoenix_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
