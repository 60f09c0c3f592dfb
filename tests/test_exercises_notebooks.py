"""The exercises in the lessons: every check of gptq_explorer.exercises has exactly one exercise cell, in the
lesson LESSONS gives it; each exercise cell and its check cell run on their own (the stub gets a "not yet"
that says the function is still to write, the solution of notebooks/solutions/ passes); and the fill tool
(gptq_explorer.exercises.solved) writes lessons whose exercise cells are the solutions and whose check cells
fail when a check fails."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

from gptq_explorer import exercises as ex
from gptq_explorer.exercises import solved

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
LESSONS = sorted(NOTEBOOKS.glob(solved.LESSON_GLOB))
STUB_LINE = 'raise NotImplementedError("write this function")'


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _exercises() -> list[tuple[Path, int, object, object, object]]:
    """(lesson, its number, markdown cell, exercise cell, check cell) for every exercise cell."""
    out = []
    for path in LESSONS:
        cells = _read(path).cells
        for i, cell in enumerate(cells):
            if solved.is_exercise(cell):
                out.append((path, int(path.name[:2]), cells[i - 1], cell, cells[i + 1] if i + 1 < len(cells)
                            else None))
    return out


EXERCISES = _exercises()
IDS = [e[3].metadata["exercise"] for e in EXERCISES]


def run_cell(source: str, ns: dict, name: str = "<cell>"):
    """Run a cell as Jupyter does: its statements, then the value of its last line if it is an expression."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), ns)
    return None if last is None else eval(compile(ast.Expression(last.value), name, "eval"), ns)


def test_every_check_has_exactly_one_exercise_cell_in_its_lesson():
    assert len(LESSONS) == 9
    found = [(n, cell.metadata["exercise"]) for _, n, _, cell, _ in EXERCISES]
    assert sorted(name for _, name in found) == sorted(ex.CHECKS)  # each check once, none unknown
    for n, checks in ex.LESSONS.items():
        assert [name for m, name in found if m == n] == [c.__name__ for c in checks], f"lesson {n}"


@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
def test_each_exercise_is_text_stub_and_check(exercise):
    path, n, text, cell, check = exercise
    name = cell.metadata["exercise"]
    assert text.cell_type == "markdown" and text.source.startswith("### Exercise: ")
    assert "<summary><b>Hint</b></summary>" in text.source
    fn = solved.function_name(cell.source)
    assert f"`{fn}(" in text.source  # the text names the function and its signature
    assert cell.source.rstrip().endswith(STUB_LINE) and cell.source.count("def ") == 1
    assert cell.metadata["tags"] == ["exercise"] and cell.outputs == [] and cell.execution_count is None
    assert check is not None and check.metadata["tags"] == ["exercise-check"]
    assert check.metadata["exercise_check"] == name
    assert check.source == f"from gptq_explorer import exercises as ex\n\nex.{name}({fn})"


@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
def test_stub_runs_alone_and_is_not_yet_written(exercise):
    path, n, text, cell, check = exercise
    ns: dict = {}
    assert run_cell(cell.source, ns, "<stub>") is None  # defining the stub does not raise
    result = run_cell(check.source, ns, "<check>")
    assert isinstance(result, ex.Result) and not result
    assert result.mistake == "not_written"
    assert result.message.startswith("Write the function first")


@pytest.mark.parametrize("exercise", EXERCISES, ids=IDS)
def test_solution_runs_alone_and_passes(exercise):
    path, n, text, cell, check = exercise
    sol = solved.Solutions.read(solved.solutions_file(NOTEBOOKS, path))
    fn = solved.function_name(cell.source)
    source = sol.cell(fn)
    assert "gptq_explorer" not in source and "NotImplementedError" not in source  # a learner's own code
    ns: dict = {}
    run_cell(source, ns, "<solution>")
    result = run_cell(check.source, ns, "<check>")
    assert result, result.message
    # the solution keeps the stub's signature and docstring
    stub_def, sol_def = (next(d for d in ast.parse(s).body if isinstance(d, ast.FunctionDef))
                         for s in (cell.source, source))
    assert ast.dump(stub_def.args) == ast.dump(sol_def.args)
    assert ast.get_docstring(stub_def) == ast.get_docstring(sol_def)


def test_solutions_folder_holds_one_file_per_lesson_with_exercises_and_a_readme():
    files = sorted(p.stem for p in (NOTEBOOKS / "solutions").glob("*.py"))
    assert files == sorted({p.stem for p, *_ in EXERCISES})
    readme = (NOTEBOOKS / "solutions" / "README.md").read_text(encoding="utf-8")
    assert "python -m gptq_explorer.exercises.solved" in readme


@pytest.fixture(scope="module")
def solved_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "solved-lessons"
    out.mkdir()
    (out / "99_stale.ipynb").write_text("{}")  # left by an earlier run: removed
    assert solved.main([str(NOTEBOOKS), str(out)]) == 0
    return out


def test_fill_tool_writes_every_lesson_and_only_lessons(solved_dir):
    assert sorted(p.name for p in solved_dir.iterdir()) == [p.name for p in LESSONS]


def test_fill_tool_replaces_exactly_the_exercise_and_check_cells(solved_dir):
    for path in LESSONS:
        before, after = _read(path), _read(solved_dir / path.name)
        assert [c.get("id") for c in before.cells] == [c.get("id") for c in after.cells]
        assert before.metadata == after.metadata
        sol_path = solved.solutions_file(NOTEBOOKS, path)
        for b, a in zip(before.cells, after.cells, strict=True):
            assert a.metadata == b.metadata and a.cell_type == b.cell_type
            if solved.is_exercise(b):
                fn = solved.function_name(b.source)
                assert a.source == solved.Solutions.read(sol_path).cell(fn)
                assert f"def {fn}(" in a.source and STUB_LINE not in a.source
            elif solved.is_check(b):
                assert a.source.startswith(b.source.rsplit("\n", 1)[0])
                assert re.search(r"^assert exercise_result, ", a.source, re.M)
            else:
                assert a.source == b.source


def test_solved_check_cells_pass_with_the_solution_and_fail_loudly_with_the_stub(solved_dir):
    for path, _, _, cell, check in EXERCISES:
        solved_cells = {c.get("id"): c for c in _read(solved_dir / path.name).cells}
        solved_check = solved_cells[check.id].source
        ns: dict = {}
        run_cell(solved_cells[cell.id].source, ns)
        assert run_cell(solved_check, ns)
        ns = {}
        run_cell(cell.source, ns)  # the unsolved stub
        with pytest.raises(AssertionError, match="Write the function first"):
            run_cell(solved_check, ns)


def test_fill_tool_refuses_to_overwrite_the_lessons_and_names_a_missing_solution(tmp_path):
    with pytest.raises(solved.SolveError, match="must not be the lessons' folder"):
        solved.solve_lessons(NOTEBOOKS, NOTEBOOKS)
    nb = _read(LESSONS[0])
    empty = tmp_path / "empty.py"
    empty.write_text("import numpy as np\n")
    with pytest.raises(solved.SolveError, match="has no function 'rtn_grid'"):
        solved.solve_notebook(nb, solved.Solutions.read(empty))
    with pytest.raises(solved.SolveError, match="should end with `ex.check_rtn_grid"):
        solved.asserted("from gptq_explorer import exercises as ex\nex.check_rtn_grid", "check_rtn_grid")
