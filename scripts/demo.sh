#!/usr/bin/env bash
# Install, then run the main job: check a folder of images against a policy, log every decision
# to SQLite, write the moderated images, and leave a review queue for the README's reviewer
# session (nothing claimed; items 1, 2 and 3 exist and are pending).
#   bash scripts/demo.sh                                         # offline: a tiny random CLIP
#   MODEL=openai/clip-vit-large-patch14 bash scripts/demo.sh     # the real model (downloads once)
# MODERATION_DEMO_SKIP_INSTALL=1 skips the install step (.venv must already hold the engine).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p demo
if [ -z "${MODERATION_DEMO_SKIP_INSTALL:-}" ]; then
  echo "Installing into .venv (the first run downloads PyTorch and the libraries: a few minutes;"
  echo "full log in demo/install.log)"
  set +e
  bash scripts/install.sh 2>&1 | tee demo/install.log | grep --line-buffered '^==> '
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" = 0 ] || { cat demo/install.log; exit 1; }
fi
# The model comes first (with MODEL set it is downloaded here): if it cannot be loaded, the
# previous run's database, held originals and images are left as they were.
.venv/bin/python -m moderation.demo demo ${MODEL:+--model "$MODEL"}
# Everything stays under demo/ (never your own $MODERATION_DB_URL), and each run starts afresh,
# so the queue and its ids are the same every time.
rm -rf demo/moderation.db demo/moderation.db-wal demo/moderation.db-shm demo/held demo/spool \
  demo/out demo/decisions.jsonl
export MODERATION_DB_URL=sqlite:///demo/moderation.db MODERATION_HELD_DIR=demo/held \
  MODERATION_SPOOL_DIR=demo/spool
if [ -n "${MODEL:-}" ]; then
  set -- policies/default.yaml --model "$MODEL"
else
  # The random tiny model needs its own thresholds (see moderation/demo.py); the policy names it.
  set -- demo/tiny-policy.yaml
fi
set -x
.venv/bin/moderation policy validate "$1"
.venv/bin/moderation check demo/images --policy "$@" --out demo/out --prompt "demo run" --user demo
.venv/bin/moderation review list --status pending
.venv/bin/moderation review stats
{ set +x; } 2>/dev/null
echo
echo "The queue above is yours to work: see \"A reviewer's session\" in README.md."
