"""pyproject.toml and environment.yml install the same packages with the same lower bounds."""

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _split(req: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def _pyproject() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"]
    return dict(_split(r) for r in reqs)


def _environment() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-e") or item.startswith("python") or item == "pip":
                continue
            name, spec = _split(item)
            out[CONDA_NAMES.get(name, name)] = spec
    return out


def test_environment_matches_pyproject():
    py, conda = _pyproject(), _environment()
    assert sorted(py) == sorted(conda), f"only in pyproject: {set(py) - set(conda)}; only in " \
                                        f"environment.yml: {set(conda) - set(py)}"
    for name, spec in py.items():
        assert conda[name] == spec, f"{name}: pyproject {spec!r} vs environment.yml {conda[name]!r}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "./run.sh test" in readme and "./run.sh app" in readme
    assert "./run.sh test" in (ROOT / ".ci" / "run").read_text()


def test_first_view_needs_no_torch():
    """The Layer Lab's first view (NumPy stepper, synthetic layer) and the NumPy engine import no torch:
    importing it is a large part of a Voila kernel's start (docs/performance.md). A fresh interpreter, so
    what other tests imported does not count."""
    import subprocess
    import sys

    code = """
import sys
import numpy as np
from gptq_explorer import QuantConfig, gptq_quantize, rtn_quantize, Hessian
from gptq_explorer.ui import LayerLab, SyntheticSource
from gptq_explorer.ui.app import configure_threads
from gptq_explorer.metrics.layer_error import output_mse_from_hessian
from gptq_explorer.models.catalog import CURATED_MODELS
lab = LayerLab(source=SyntheticSource(), models={})
assert lab.errors == [] and lab.run.n == 576
X = np.random.default_rng(0).normal(size=(64, 16))
H = Hessian(16).add_batch(X).H
res = gptq_quantize(np.ones((4, 16)), H, QuantConfig(group_size=8))
assert output_mse_from_hessian(np.ones((4, 16)), res.weight, H) >= 0
assert rtn_quantize(np.ones((4, 16))).codes.shape == (4, 16)
assert "smollm2-135m" in CURATED_MODELS
from gptq_explorer.ui.app import explorer_app
from gptq_explorer.ui.preheat import page_query
assert page_query() == ""
assert not any(m == "voila" or m.startswith("voila.") for m in sys.modules)  # voila.utils: 1.2 s in a kernel
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")), configure_threads())
"""
    env = {**__import__("os").environ, "GPTQ_EXPLORER_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] 1", out.stdout


def test_prepare_check_needs_no_torch(tmp_path):
    """./run.sh asks `gptq-explorer prepare --check` on every start: it must not pay for torch."""
    import subprocess
    import sys

    code = """
import sys
from gptq_explorer.cli import main
assert main(["prepare", "--check"]) == 1  # an empty cache
assert "torch" not in sys.modules, "prepare --check imported torch"
"""
    env = {**__import__("os").environ, "GPTQ_EXPLORER_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not converted yet" in out.stdout


def test_lazy_names_never_shadow_a_submodule():
    """A package's lazy name equal to one of its submodules' names (metrics.perplexity, the function, in
    metrics/perplexity.py) turned into the module once anything imported that submodule: `from
    gptq_explorer.metrics import perplexity` then gave a module, depending on what ran before."""
    import importlib
    import pkgutil

    import gptq_explorer

    packages = ["gptq_explorer"] + [info.name for info in pkgutil.walk_packages(gptq_explorer.__path__,
                                                                              "gptq_explorer.") if info.ispkg]
    checked = 0
    for name in packages:
        package = importlib.import_module(name)
        submodules = {m.name for m in pkgutil.iter_modules(package.__path__)}
        lazy = set(getattr(package, "_LAZY", {}))
        checked += bool(lazy)
        assert not lazy & submodules, f"{name}: {sorted(lazy & submodules)}"
    assert checked >= 4  # the package, metrics, models, ui
    from gptq_explorer.metrics import bf16, perplexity  # bf16 imports the perplexity submodule

    assert callable(perplexity) and bf16.perplexity is perplexity


def test_app_server_leaves_out_the_slow_optional_import():
    """gptq_explorer.ui.serve is voila with rfc3987_syntax blocked (2-3 s of the server's start here): it
    passes its arguments through, and jsonschema, which jupyter_server uses, works without that module."""
    import subprocess
    import sys

    code = """
import sys
from gptq_explorer.ui import serve
try:
    serve.main(["--version"])
except SystemExit:
    pass
import jsonschema
jsonschema.validate({"a": "x"}, {"type": "object", "properties": {"a": {"type": "string"}}},
                    format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
print("blocked" if sys.modules.get("rfc3987_syntax", 0) is None else "loaded")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert re.fullmatch(r"0\.5\.\d+", lines[0]) and lines[-1] == "blocked", out.stdout


def test_numpy_engine_while_torch_is_half_imported(monkeypatch):
    """The app's background model load may be importing torch when a control change runs the NumPy engine:
    a half-imported torch (no Tensor yet) must read as 'not a tensor', not raise."""
    import sys
    import types

    import numpy as np

    from gptq_explorer import Hessian, QuantConfig, gptq_quantize, rtn_quantize
    from gptq_explorer.lazy_torch import is_tensor

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    W = np.random.default_rng(0).normal(size=(8, 16))
    H = Hessian(16).add_batch(np.random.default_rng(1).normal(size=(64, 16))).H
    assert not is_tensor(W)
    assert gptq_quantize(W, H, QuantConfig(group_size=8)).codes.shape == (8, 16)
    assert rtn_quantize(W).codes.shape == (8, 16)
