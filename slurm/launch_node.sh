#!/usr/bin/env bash
# One node of a multi-node run: the deepspeed launcher with --no_ssh for this node's rank.
# train.sbatch runs it once per node through srun; tests run it twice on loopback as 2 "nodes".
#
# Needs: HOSTFILE (one "host slots=N" line per node), NODE_RANK, MASTER_ADDR, MASTER_PORT, RECIPE, RUN_DIR.
# Extra arguments go to `mthl-ds train` (e.g. --set train.steps=1000).
set -euo pipefail
: "${HOSTFILE:?}" "${NODE_RANK:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${RECIPE:?}" "${RUN_DIR:?}"
PYTHON=${PYTHON:-python}
echo "node $NODE_RANK on $(hostname): master $MASTER_ADDR:$MASTER_PORT, hostfile $HOSTFILE" >&2
# A node without the environment (a venv on a local disk, a missing module) fails here, naming itself, before any
# rank starts; srun then ends the job (train.sbatch).
if ! "$PYTHON" -c "import mthl_ds" 2>&1; then
  echo "node $NODE_RANK on $(hostname): $PYTHON cannot import mthl_ds; is the environment installed on this node?" >&2
  exit 3
fi
exec "$PYTHON" -m deepspeed.launcher.runner --no_ssh --hostfile "$HOSTFILE" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module mthl_ds train --recipe "$RECIPE" --out "$RUN_DIR" "$@"
