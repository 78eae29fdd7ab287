#!/usr/bin/env bash
# Serve an mlm-scorer export with the official tensorflow/serving Docker image, with request batching.
#
#   scripts/serve_tf_serving.sh EXPORT_BASE_DIR [MODEL_NAME]
#
# EXPORT_BASE_DIR is the directory holding numeric version directories (1/, 2/, ...), as written by
# mlm-export. The script uses (and, if missing, writes with export/serving_config.py)
#   EXPORT_BASE_DIR/models.config                    --model_config_file (name, base path, versions)
#   EXPORT_BASE_DIR/<latest>/batching_parameters.txt --batching_parameters_file
# and starts the server on gRPC port $GRPC_PORT (8500) and REST port $REST_PORT (8501).
#
# Environment: TFS_IMAGE (default tensorflow/serving:latest, or :latest-gpu with GPU=1), GPU=1 (adds
# --gpus all), REST_PORT, GRPC_PORT, MAX_BATCH_SIZE (64; must equal the client's max_batch_size),
# NUM_BATCH_THREADS (2), BATCH_TIMEOUT_MICROS (2000), INTRA_OP_THREADS (0 = TF's default).
#
# Then score with (the clients' padding_row option, on by default, is required with this batching file,
# see export/serving_config.py; max_batch_size must match MAX_BATCH_SIZE):
#   mlm-score in.tsv -o out.parquet --model EXPORT_BASE_DIR --server http://HOST:8501 --model-name bert \
#       --engine-option max_batch_size=64
# Not run in this repository's CI: Docker and tensorflow_model_server are not available there.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
BASE=$(cd "$1" && pwd)
NAME=${2:-bert}
GPU=${GPU:-0}
REST_PORT=${REST_PORT:-8501}
GRPC_PORT=${GRPC_PORT:-8500}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-64}
NUM_BATCH_THREADS=${NUM_BATCH_THREADS:-2}
BATCH_TIMEOUT_MICROS=${BATCH_TIMEOUT_MICROS:-2000}
INTRA_OP_THREADS=${INTRA_OP_THREADS:-0}
if [[ "$GPU" == 1 ]]; then
  IMAGE=${TFS_IMAGE:-tensorflow/serving:latest-gpu}
  GPU_ARGS=(--gpus all)
else
  IMAGE=${TFS_IMAGE:-tensorflow/serving:latest}
  GPU_ARGS=()
fi

VERSION=$(find "$BASE" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' -printf '%f\n' | sort -n | tail -1)
if [[ -z "$VERSION" || ! -f "$BASE/$VERSION/saved_model.pb" ]]; then
  echo "error: $BASE has no numeric version directory with a saved_model.pb; export with mlm-export first" >&2
  exit 1
fi
if [[ ! -f "$BASE/$VERSION/batching_parameters.txt" || ! -f "$BASE/models.config" ]]; then
  echo "writing batching_parameters.txt and models.config (max_batch_size=$MAX_BATCH_SIZE)" >&2
  python - "$BASE/$VERSION" "$NAME" "$MAX_BATCH_SIZE" "$NUM_BATCH_THREADS" "$BATCH_TIMEOUT_MICROS" <<'PY'
import sys
from mlm_export.serving_config import write_serving_files
vdir, name, mbs, nbt, btm = sys.argv[1:]
for p in write_serving_files(vdir, model_name=name, max_batch_size=int(mbs), num_batch_threads=int(nbt),
                             batch_timeout_micros=int(btm)):
    print("wrote", p, file=sys.stderr)
PY
fi

echo "serving $BASE (version $VERSION) as model '$NAME' from $IMAGE: gRPC :$GRPC_PORT, REST :$REST_PORT" >&2
# The image's entrypoint runs tensorflow_model_server --port=8500 --rest_api_port=8501 ... "$@";
# --model_config_file takes precedence over its MODEL_NAME/--model_base_path.
exec docker run --rm --init "${GPU_ARGS[@]}" \
  -p "${GRPC_PORT}:8500" -p "${REST_PORT}:8501" \
  --mount "type=bind,source=${BASE},target=/models/${NAME},readonly" \
  -e MODEL_NAME="$NAME" \
  "$IMAGE" \
  --model_config_file="/models/${NAME}/models.config" \
  --enable_batching=true \
  --batching_parameters_file="/models/${NAME}/${VERSION}/batching_parameters.txt" \
  --tensorflow_intra_op_parallelism="$INTRA_OP_THREADS" \
  --rest_api_timeout_in_ms=60000 \
  --file_system_poll_wait_seconds=30
