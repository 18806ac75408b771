#!/usr/bin/env bash
# Fixed-seed runs whose metrics must not change under a refactor: run it before and after,
# then `diff BEFORE/digest.txt AFTER/digest.txt` (empty = identical behaviour).
#   bash scripts/same-behaviour.sh OUT_DIR [--digest-only]
# The default run, the `quick` study (6 cells), an fp8_e2e testbed run with rollout dumps, and
# the TRL example with dumps. The digest hashes every metrics row without its wall-clock keys
# (metrics.TIMING_KEYS), the study's per-run results, and every dump shard's rows.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: same-behaviour.sh OUT_DIR [--digest-only]}
bin=.venv/bin
if [ "${2:-}" != --digest-only ]; then
rm -rf "$out"; mkdir -p "$out"
$bin/drpo train --config configs/default.yaml --out "$out/default"
$bin/drpo compare --preset quick --out "$out/quick"
$bin/drpo train --config configs/testbed.yaml --out "$out/fp8_e2e" --set seed=5 --set rollout.precision=fp8_e2e \
  --set train.steps=6 --set train.eval_every=3 --set train.save_every=6 --set dump.every=2
$bin/python examples/trl/train_drpo_trl.py --steps 3 --dump-every 1 --out "$out/trl"
fi
$bin/python - "$out" <<'PY' | tee "$out/digest.txt"
import hashlib, json, re, sys
from pathlib import Path
import pyarrow.parquet as pq
out = Path(sys.argv[1])
def h(b): return hashlib.sha256(b).hexdigest()[:16]
for p in sorted(out.rglob("*")):
    rel = re.sub(r"-pid\d+", "", str(p.relative_to(out)))  # dump shards are named by the writer's pid
    if p.name == "metrics.jsonl":
        rows = [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in p.read_text().splitlines()]
        print(rel, len(rows), h(json.dumps(rows, sort_keys=True).encode()))
    elif p.name == "log_history.json":  # TRL's own log: drop its wall-clock keys (step_time, train_runtime, ...)
        rows = [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k}
                for r in json.loads(p.read_text())]
        print(rel, len(rows), h(json.dumps(rows, sort_keys=True).encode()))
    elif p.suffix == ".parquet":
        t = pq.read_table(p)
        print(rel, t.num_rows, h(json.dumps(t.to_pylist(), sort_keys=True, default=str).encode()))
PY
