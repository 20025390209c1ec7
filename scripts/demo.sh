#!/usr/bin/env bash
# Install, then run the main job: check a folder of images against the default policy, log every
# decision to SQLite, write the moderated images, and show the review queue.
#   bash scripts/demo.sh                                         # offline: a tiny random CLIP
#   MODEL=openai/clip-vit-large-patch14 bash scripts/demo.sh     # the real model (downloads once)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh >/dev/null
export MODERATION_DB_URL=${MODERATION_DB_URL:-sqlite:///demo/moderation.db}
.venv/bin/python -m moderation.demo demo
MODEL=${MODEL:-demo/tiny-clip}
set -x
.venv/bin/moderation policy validate policies/default.yaml
.venv/bin/moderation check demo/images --policy policies/default.yaml --model "$MODEL" \
  --out demo/out --prompt "demo run" --user demo
.venv/bin/moderation review list
.venv/bin/moderation review stats
