#!/usr/bin/env bash
# Entrypoint of Dockerfile.triton: build the engines on this machine's GPUs unless a matching
# build is already in the engine volume (build.json), then exec Triton on the filled repository.
#   TRIDENT_MODEL_DIR   HF checkpoint, mounted read-only (default /models/model)
#   TRIDENT_ENGINE_DIR  engines + model repository, a volume (default /engines)
#   TRIDENT_BUILD_ARGS  extra build/build_engine.py flags, e.g. "--tp-size 2 --max-batch-size 64"
# Arguments are passed to scripts/launch_triton_gpu.py (e.g. --log-verbose 1).
set -euo pipefail

model_dir="${TRIDENT_MODEL_DIR:-/models/model}"
engine_dir="${TRIDENT_ENGINE_DIR:-/engines}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ ! -f "${model_dir}/config.json" ]]; then
    echo "[entrypoint] no Hugging Face checkpoint in ${model_dir}: mount one, e.g." >&2
    echo "  docker run ... -v \$PWD/.cache/models/smollm2-135m-instruct:/models/model:ro ..." >&2
    exit 2
fi

# shellcheck disable=SC2086  # TRIDENT_BUILD_ARGS is a list of flags
python3 "${here}/build/build_engine.py" --model-dir "${model_dir}" --out "${engine_dir}" \
    --skip-existing ${TRIDENT_BUILD_ARGS:-}

exec python3 "${here}/scripts/launch_triton_gpu.py" --model-repository "${engine_dir}/model_repository" "$@"
