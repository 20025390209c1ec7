#!/usr/bin/env bash
# Install, then run the main job: check a folder of images against a policy, log every decision
# to SQLite, write the moderated images, and work the review queue.
#   bash scripts/demo.sh                                         # offline: a tiny random CLIP
#   MODEL=openai/clip-vit-large-patch14 bash scripts/demo.sh     # the real model (downloads once)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p demo
bash scripts/install.sh >demo/install.log 2>&1 || { cat demo/install.log; exit 1; }
export MODERATION_DB_URL=${MODERATION_DB_URL:-sqlite:///demo/moderation.db}
export MODERATION_HELD_DIR=${MODERATION_HELD_DIR:-demo/held} MODERATION_SPOOL_DIR=${MODERATION_SPOOL_DIR:-demo/spool}
.venv/bin/python -m moderation.demo demo
if [ -n "${MODEL:-}" ]; then
  POLICY=policies/default.yaml
else
  # The random tiny model needs its own thresholds (see moderation/demo.py).
  MODEL=demo/tiny-clip POLICY=demo/tiny-policy.yaml
fi
set -x
.venv/bin/moderation policy validate "$POLICY"
.venv/bin/moderation check demo/images --policy "$POLICY" --model "$MODEL" \
  --out demo/out --prompt "demo run" --user demo
.venv/bin/moderation review list
.venv/bin/moderation review claim --reviewer demo-reviewer -n 2
.venv/bin/moderation review stats
