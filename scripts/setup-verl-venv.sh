#!/usr/bin/env bash
# Create (or update) the separate environment the verl integration tests run in.
#
# verl 0.9.1 pins transformers>=5.5.3,<5.11, which the main .venv (transformers 5.23) does
# not satisfy, so verl gets its own venv: torch pinned to 2.13.0 through constraints.txt
# (the local CPU wheel, never a CUDA build), verl==0.9.1 with its "verl-core" extra (what its
# default trainer, `trainer.use_v1=true`, imports: TransferQueue>=0.1.10 as verl asks, ray,
# cachetools, fastapi, uvicorn, ...), drpo editable with the [verl] extra, and pytest.
#
#   scripts/setup-verl-venv.sh            # -> /work/main/.venv-verl (or $VERL_VENV)
#   scripts/setup-verl-venv.sh /tmp/venv  # another path
#
# Idempotent: a venv that already has verl 0.9.1, the pinned torch and an importable drpo
# plugin is left as it is (a second run takes about a second). uv does the resolution and
# the downloads (several times faster than pip for verl's ~150 dependencies); it is
# bootstrapped with pip into the venv itself, so nothing outside the venv changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VERL_VENV:-$ROOT/.venv-verl}}"
PYTHON="${PYTHON:-python3}"
VERL_VERSION="0.9.1"
TORCH_VERSION="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$ROOT/constraints.txt")"

if [[ -z "$TORCH_VERSION" ]]; then
  echo "setup-verl-venv: constraints.txt has no torch==X pin" >&2
  exit 1
fi

already_done() {
  [[ -x "$VENV/bin/python" ]] || return 1
  "$VENV/bin/python" - "$VERL_VERSION" "$TORCH_VERSION" "$ROOT" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys, pathlib
verl_v, torch_v, root = sys.argv[1:]
assert md.version("verl") == verl_v
assert md.version("torch").split("+")[0] == torch_v
assert md.version("pytest")
import transfer_queue  # verl's v1 trainer (the default) needs it
import verl.trainer.ppo.v1.utils
import drpo  # editable install of this checkout
assert pathlib.Path(drpo.__file__).resolve().is_relative_to(pathlib.Path(root).resolve())
EOF
}

start=$(date +%s)
if already_done; then
  echo "setup-verl-venv: $VENV is ready (verl $VERL_VERSION, torch $TORCH_VERSION)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade uv

# uv does not read pip's config: hand it this machine's local wheel folder and indexes
# (where they exist) so torch comes from the local CPU wheel.
UV_ARGS=(--python "$VENV/bin/python" -c "$ROOT/constraints.txt")
for links in ${PIP_FIND_LINKS:-} /opt/wheels; do
  [[ -d "$links" ]] && UV_ARGS+=(--find-links "$links")
done
EXTRA_INDEX="$("$VENV/bin/python" -m pip config get global.extra-index-url 2>/dev/null || true)"
for url in $EXTRA_INDEX; do
  UV_ARGS+=(--extra-index-url "$url")
done
UV_ARGS+=(--index-strategy unsafe-best-match)

"$VENV/bin/python" -m uv pip install "${UV_ARGS[@]}" \
  "torch==$TORCH_VERSION" "verl[verl-core]==$VERL_VERSION" -e "$ROOT[verl,inspect]" pytest

already_done || {
  echo "setup-verl-venv: install finished but the venv check failed; run" >&2
  echo "  $VENV/bin/python -c 'import verl, drpo.integrations.verl'" >&2
  exit 1
}
echo "setup-verl-venv: $VENV ready in $(( $(date +%s) - start )) s (verl $VERL_VERSION, torch $TORCH_VERSION)"
