#!/usr/bin/env bash
# segstream next to scikit-learn's mini-batch models on the same generated stream (issue 6).
# Installs its own Python dependencies in a venv (target/sklearn-venv), builds segstream, runs
# `segstream bench pipeline` on all cores (decode + fuse + models), writes the model vectors of
# the timed stream, and runs MiniBatchKMeans + SGDRegressor partial_fit over the same rows in
# batches of 1024 (models only: no decoding, no feature fusion; BLAS on all cores). Prints both
# rates and their ratio. Usage: bash benches/sklearn/run.sh   (EVENTS=... to change the size)
set -euo pipefail
cd "$(dirname "$0")/../.."
events="${EVENTS:-1000000}"
out=target/sklearn
venv=target/sklearn-venv
mkdir -p "$out"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r benches/sklearn/requirements.txt
cargo build --release --quiet
target/release/segstream bench pipeline --events "$events" --users 100000 \
  --vectors-out "$out/vectors.f64" >"$out/segstream.txt"
sed -n '/^{/,/^}/p' "$out/segstream.txt" >"$out/segstream.json"
tail -n 1 "$out/segstream.txt"
"$venv/bin/python" benches/sklearn/compare.py "$out/vectors.f64" "$out/segstream.json"
