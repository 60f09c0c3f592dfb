"""Serve the explorer with Voila, seconds sooner: `python -m gptq_explorer.ui.serve explorer.ipynb [args]`.

Exactly `voila [args]`, with one optional import blocked. jupyter_server validates its events with
jsonschema, which imports every optional format checker it finds, and `rfc3987_syntax` (its IRI check)
compiles ~35 Earley parsers at import: most of the server's start (docs/performance.md)
(jupyter-server/jupyter_server#1559, python-jsonschema/jsonschema#1428). No Jupyter schema uses the
"iri" formats, so without it jsonschema just skips that check. Plain `voila` serves the same app.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # None in sys.modules makes `import rfc3987_syntax` raise ImportError, which jsonschema suppresses
    sys.modules.setdefault("rfc3987_syntax", None)
    from voila.app import main as voila_main

    sys.argv = ["voila", *(sys.argv[1:] if argv is None else argv)]
    return voila_main() or 0


if __name__ == "__main__":
    raise SystemExit(main())
