#!/usr/bin/env bash
# Build the documentation (docs/: the Markdown pages and the API reference from the docstrings) into
# docs/_build/html. Every Sphinx warning is an error: a public name without a docstring, a broken
# cross-reference or bad reST/Markdown fails the build (exit status != 0), after all of them are listed.
#   scripts/build_docs.sh            needs `pip install -e ".[docs]"` (Sphinx, MyST, Furo; no internet at build time)
#   PYTHON=/path/to/python scripts/build_docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import sphinx, myst_parser" 2>/dev/null; then
  echo "build_docs: Sphinx or myst-parser is missing; install the docs extra: $PY -m pip install -e '.[docs]'" >&2
  exit 2
fi
out=docs/_build/html
rm -rf "$out" docs/_build/doctrees
# -E -a: read and write everything (an incremental build does not repeat the warnings of unchanged pages);
# -n: nitpicky (every reference must resolve); -W --keep-going: warnings are errors, all of them reported.
exec "$PY" -m sphinx -b html -E -a -n -W --keep-going -q -d docs/_build/doctrees docs "$out"
