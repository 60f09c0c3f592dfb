"""The README is a short front door, every relative link in it and in docs/ leads somewhere, and nothing in
the repository points at material that users do not have."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 12 * 1024

# [text](target) and ![alt](target); the target ends at the first space (a title may follow) or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))  # links inside code blocks are code, not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_readme_is_at_most_12_kb():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail into a page of docs/ and link it")


def test_there_are_docs_pages():
    assert len(PAGES) > 1, "docs/*.md is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in _links(page):
        if target.startswith(EXTERNAL):
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif not dest.resolve().is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_no_file_points_at_material_users_do_not_have():
    """Notes kept beside the repository while it was built are not shipped: nothing may point at them."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    needle = "shared" + "/reference"  # spelled in two parts so that this file does not match itself
    found = subprocess.run([git, "grep", "-n", "-I", "--untracked", "-F", needle], cwd=ROOT,
                           capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr
    assert found.stdout == "", f"files refer to {needle}, which users do not have:\n{found.stdout}"


def test_readme_headline_table_is_the_shipped_reports():
    """Each row of the README's GPTQ-vs-RTN table is a shipped report's perplexity, rounded to 2 decimals."""
    from gptq_explorer.services.results import find_run

    rows = re.findall(r"^\| (baseline \(FP32\)|RTN|GPTQ)(?:, (\d)-bit, (groups of 128|one scale per row))? "
                      r"\| \**([\d,.]+)\** \| \**([\d,.]+)\** \|$", README.read_text(), flags=re.M)
    assert len(rows) == 7
    for method, bits, grouping, prose, code in rows:
        if method.startswith("baseline"):
            run = find_run(method="fp")
        else:
            run = find_run(method=method.lower(), bits=int(bits), sym=True,
                           group_size=128 if grouping == "groups of 128" else -1)
        assert run is not None, (method, bits, grouping)
        shown = (float(prose.replace(",", "")), float(code.replace(",", "")))
        assert shown == (round(run["perplexity"]["prose"], 2), round(run["perplexity"]["code"], 2))
