#!/usr/bin/env bash
# Quality of segstream on the real Online Retail data against scikit-learn and lifetimes.
# Installs its own Python dependencies in a venv (target/quality-venv), builds segstream, replays
# the data (whole, and up to a cut-off that holds out the last 3 months) and prints a Markdown
# report, then does the same for a synthetic BG/NBD cohort with known truth (bgnbd_cohort.py).
# Takes a few minutes on a fresh machine. Usage: bash benches/quality/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${SEGSTREAM_RETAIL_CSV:-tests/data/online_retail.csv.gz}"
out=target/quality
venv=target/quality-venv
mkdir -p "$out"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r benches/quality/requirements.txt
cargo build --release --quiet
bin=target/release/segstream
"$bin" retail --input "$data" --output "$out/purchases.ndjson" --rejects "$out/rejects.ndjson" >"$out/retail.json"
"$bin" replay --purchases "$out/purchases.ndjson" --users-out "$out/users.ndjson" \
  --changes-out "$out/changes.ndjson" --save-model "$out/model.json" >"$out/replay.txt"
sed -n '/^{/,/^}/p' "$out/replay.txt" >"$out/replay.json"
cutoff=2011-09-09T23:59:59Z
"$bin" replay --purchases "$out/purchases.ndjson" --until "$cutoff" \
  --users-out "$out/users-cutoff.ndjson" >"$out/replay-cutoff.txt"
echo "# segstream quality on UCI Online Retail ($(date -u +%Y-%m-%d))"
echo
"$venv/bin/python" benches/quality/compare.py "$data" "$out/users.ndjson" "$out/model.json" \
  "$out/replay.json" "$out/users-cutoff.ndjson" "$cutoff"
echo "## Synthetic personas (ground truth)"
echo
cargo test --release --quiet --test synthetic_quality -- --nocapture 2>/dev/null | grep '^ARI'
echo
echo "## A BG/NBD + Gamma-Gamma cohort with known truth"
echo
"$venv/bin/python" benches/quality/bgnbd_cohort.py generate "$out/cohort.ndjson" "$out/cohort-truth.csv" >/dev/null
"$bin" replay --purchases "$out/cohort.ndjson" --until 2012-01-01T00:00:00Z \
  --users-out "$out/cohort-users.ndjson" >"$out/cohort-replay.txt"
sed -n '/^{/,/^}/p' "$out/cohort-replay.txt" | "$venv/bin/python" -c 'import json, sys
r = json.load(sys.stdin)
print("- segment changes %d, flaps %d (%.2f %%)" % (r["changes"], r["flaps"], 100 * r["flapping_share"]))'
"$venv/bin/python" benches/quality/bgnbd_cohort.py score "$out/cohort-truth.csv" \
  "$out/cohort-users.ndjson" 30 "$out/cohort.ndjson"
