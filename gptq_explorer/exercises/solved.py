"""The lessons with their exercises solved: what CI runs, and what an instructor can hand out.

    python -m gptq_explorer.exercises.solved notebooks build/solved-lessons

copies every lesson (`NN_*.ipynb`) of the first folder into the second. In each copy, every exercise cell
(a code cell tagged "exercise", its metadata naming the check: `"exercise": "check_rtn_grid"`) is replaced by
the solution: the function of the same name in `<notebooks>/solutions/<lesson>.py`, with that file's imports
so that the cell still runs on its own. Every check cell (tagged "exercise-check") gets an assertion, so a
solution that no longer passes its check fails the notebook under nbval instead of showing a red box.

The copies are meant to run from the output folder exactly as the lessons run from `notebooks/`: keep that
folder as deep as `notebooks/` (e.g. `build/solved-lessons`), in case a lesson reads a relative path.
"""

from __future__ import annotations

import argparse
import ast
import copy
from dataclasses import dataclass
from pathlib import Path

LESSON_GLOB = "[0-9][0-9]_*.ipynb"
EXERCISE_TAG = "exercise"
CHECK_TAG = "exercise-check"
ASSERTED = "# added by gptq_explorer.exercises.solved: the solution must pass"


class SolveError(ValueError):
    """A lesson, an exercise cell or a solution file that the tool cannot pair up."""


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_exercise(cell) -> bool:
    return cell.get("cell_type") == "code" and EXERCISE_TAG in _tags(cell)


def is_check(cell) -> bool:
    return cell.get("cell_type") == "code" and CHECK_TAG in _tags(cell)


def function_name(source: str) -> str:
    """The one function an exercise cell defines."""
    defs = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    if len(defs) != 1:
        raise SolveError(f"an exercise cell should define exactly one function; this one defines {defs}")
    return defs[0]


@dataclass(frozen=True)
class Solutions:
    """One lesson's solutions file: its import lines and the source of each function."""

    path: Path
    imports: str
    functions: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> Solutions:
        text = path.read_text(encoding="utf-8")
        body = ast.parse(text).body
        imports = "\n".join(ast.get_source_segment(text, n) for n in body
                            if isinstance(n, ast.Import | ast.ImportFrom))
        functions = {n.name: ast.get_source_segment(text, n) for n in body if isinstance(n, ast.FunctionDef)}
        return cls(path, imports, functions)

    def cell(self, name: str) -> str:
        """The solved exercise cell: the file's imports, then the function, laid out like the exercise."""
        if name not in self.functions:
            raise SolveError(f"{self.path} has no function {name!r} (it has {sorted(self.functions)})")
        return f"{self.imports}\n\n\n{self.functions[name]}" if self.imports else self.functions[name]


def solutions_file(notebooks: Path, lesson: Path) -> Path:
    return Path(notebooks) / "solutions" / f"{Path(lesson).stem}.py"


def asserted(source: str, check: str) -> str:
    """A check cell that raises when the check fails: its last line `ex.<check>(<fn>)` becomes an assertion
    whose message is the check's own, and the result is still shown."""
    *head, last = source.rstrip().split("\n")
    call = ast.parse(last).body[0] if last.strip() else None
    ok = (isinstance(call, ast.Expr) and isinstance(call.value, ast.Call)
          and ast.unparse(call.value.func) == f"ex.{check}")
    if not ok:
        raise SolveError(f"the check cell of {check} should end with `ex.{check}(your_function)`; "
                         f"it ends with {last!r}")
    return "\n".join([*head, f"exercise_result = {last.strip()}",
                      f"assert exercise_result, str(exercise_result)  {ASSERTED}",
                      "exercise_result"])


def solve_notebook(nb, solutions: Solutions):
    """A copy of the notebook (an nbformat node) with every exercise solved and every check asserted."""
    nb = copy.deepcopy(nb)
    seen = set()
    for cell in nb.cells:
        if is_exercise(cell):
            check = cell.metadata.get("exercise")
            if not check:
                raise SolveError(f"exercise cell {cell.get('id')} names no check in its metadata")
            cell.source = solutions.cell(function_name(cell.source))
            seen.add(check)
        elif is_check(cell):
            check = cell.metadata.get("exercise_check")
            cell.source = asserted(cell.source, check)
            if check not in seen:
                raise SolveError(f"the check cell of {check} comes before its exercise cell")
    return nb


def solve_lessons(notebooks: Path, outdir: Path) -> list[Path]:
    """Write every lesson of `notebooks` into `outdir`, its exercises solved; returns the files written.
    Lessons earlier runs left in `outdir` are removed first, so a renamed lesson leaves no stale copy."""
    import nbformat  # only the tool needs it; the checks do not

    notebooks, outdir = Path(notebooks), Path(outdir)
    if outdir.resolve() == notebooks.resolve():
        raise SolveError("the output folder must not be the lessons' folder: the copies would replace them")
    lessons = sorted(notebooks.glob(LESSON_GLOB))
    if not lessons:
        raise SolveError(f"no lessons ({LESSON_GLOB}) in {notebooks}")
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob(LESSON_GLOB):
        old.unlink()
    written = []
    for lesson in lessons:
        nb = nbformat.read(lesson, as_version=4)
        if any(is_exercise(c) for c in nb.cells):
            nb = solve_notebook(nb, Solutions.read(solutions_file(notebooks, lesson)))
        nbformat.validate(nb)
        out = outdir / lesson.name
        nbformat.write(nb, out)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptq_explorer.exercises.solved",
                                     description="Copy the lessons with every exercise cell solved.")
    parser.add_argument("notebooks", type=Path, help="the lessons' folder (with solutions/ inside)")
    parser.add_argument("outdir", type=Path, help="where the solved copies go, e.g. build/solved-lessons")
    args = parser.parse_args(argv)
    try:
        written = solve_lessons(args.notebooks, args.outdir)
    except SolveError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"{len(written)} lessons written to {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
