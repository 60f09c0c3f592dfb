"""The package map of docs/architecture.md holds in the code: every import of ours (module level or inside a
function) goes down the table, and the front-ends (cli.py, ui/, lessons/) never import each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import gptq_explorer

PACKAGE = Path(gptq_explorer.__file__).parent

# the rooms, top of the table first; a room may import the rooms listed after it (and lazy, lazy_torch)
LAYERS = ["settings", "engine", "data", "models", "metrics", "checkpoint", "services", "views", "exercises"]
FRONT_ENDS = ["cli", "ui", "lessons"]
ANYONE = {"lazy", "lazy_torch"}


def room_of(parts: tuple[str, ...]) -> str:
    """('ui', 'layer_lab') -> 'ui'; ('cli',) -> 'cli'; () -> the package itself."""
    return parts[0] if parts else "__init__"


def allowed(room: str) -> set[str]:
    if room in ANYONE:
        return set(ANYONE)
    if room in FRONT_ENDS or room == "__init__":
        return set(LAYERS) | ANYONE | ({room} if room != "__init__" else set())
    below = LAYERS[:LAYERS.index(room)]
    return set(below) | ANYONE | {room}


def _submodule_or_facade(name: str) -> tuple[str, ...]:
    if name == "__version__":  # the package's version, which anyone may quote
        return ("lazy",)
    is_room = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()
    return (name,) if is_room else ()


def imports_of(path: Path) -> set[str]:
    """The rooms a module imports, relative imports resolved."""
    here = path.relative_to(PACKAGE).parts[:-1]  # the package a relative import starts from
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = (*base, *(node.module.split(".") if node.module else ()))
                if not target:  # from .. import x: a room, or a name of the package's facade (__init__)
                    target = _submodule_or_facade(node.names[0].name)
            elif node.module and node.module.split(".")[0] == "gptq_explorer":
                target = tuple(node.module.split(".")[1:]) or _submodule_or_facade(node.names[0].name)
            else:
                continue
            rooms.add(room_of(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gptq_explorer" and len(parts) > 1:
                    rooms.add(room_of(tuple(parts[1:])))
    return rooms


def test_every_module_has_a_room():
    known = set(LAYERS) | set(FRONT_ENDS) | ANYONE | {"__init__"}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        assert room_of(rel) in known, f"{path}: not a room of docs/architecture.md"


def test_imports_go_down_the_table_and_front_ends_stay_apart():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = room_of(path.relative_to(PACKAGE).with_suffix("").parts)
        for target in imports_of(path) - allowed(room):
            bad.append(f"{path.relative_to(PACKAGE)} ({room}) imports {target}")
    assert bad == []


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    fake = tmp_path / "gptq_explorer"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "x.py").write_text("from ..ui import LayerLab\nfrom .. import settings\n")
    (fake / "lessons").mkdir()
    (fake / "lessons" / "y.py").write_text("def f():\n    from gptq_explorer.cli import main\n")
    (fake / "settings.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert imports_of(fake / "engine" / "x.py") == {"ui", "settings"}
    assert imports_of(fake / "lessons" / "y.py") == {"cli"}
    assert "ui" not in allowed("engine") and "cli" not in allowed("lessons")
    assert "settings" in allowed("engine") and "engine" not in allowed("settings")


def test_the_exercises_sit_below_the_rooms_they_check_and_above_the_front_ends():
    assert {"engine", "checkpoint", "metrics"} <= allowed("exercises")
    assert not set(FRONT_ENDS) & allowed("exercises")
    assert all("exercises" in allowed(front) for front in FRONT_ENDS)
    assert all("exercises" not in allowed(room) for room in LAYERS if room != "exercises")
