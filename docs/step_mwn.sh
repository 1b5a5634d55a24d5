#!/bin/sh
# Redraw docs/step_mwn.svg and docs/step_mwn.png: the step diagram (block view) of the
# Meta-Weight-Net example. Needs Graphviz's `dot` (apt-get install graphviz). Run from anywhere:
#     sh docs/step_mwn.sh
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m mlocompile graph examples/data_reweighting.py --kind step -o docs/step_mwn.svg  # also writes step_mwn.dot
dot -Tpng -Gdpi=60 docs/step_mwn.dot -o docs/step_mwn.png  # 60 dpi: readable, ~0.6 MB
rm docs/step_mwn.dot
