#!/usr/bin/env bash
# Entrypoint of Dockerfile.triton: build the engines on this machine's GPUs unless a matching
# build is already in the engine volume (build.json), then exec Triton on the filled repository.
#   TRIDENT_MODEL_DIR   HF checkpoint, mounted read-only (default /models/model)
#   TRIDENT_ENGINE_DIR  engines + model repository, a volume (default /engines)
#   TRIDENT_BUILD_ARGS  extra build/build_engine.py flags, e.g. "--tp-size 2 --max-batch-size 64"
#   TRIDENT_TRTLLM_CONVERT_SCRIPT  a convert_checkpoint.py to use instead of the image's own copy
#                       (or, when the image has none, the one downloaded at image build)
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
mkdir -p "${engine_dir}"

# Which converter a build would use: the image's copy first, the downloaded one otherwise.
python3 -c 'from trident.trtllm.converter import find_convert_script as f; print("[entrypoint] converter:", f() or "none found")' \
    || true

# Several replicas can share one engine volume (a ReadWriteMany claim in Kubernetes): one builds,
# the others wait on the lock and then find a matching build.json.
if command -v flock >/dev/null; then
    exec 9>"${engine_dir}/.build.lock"
    if ! flock -n 9; then
        echo "[entrypoint] another replica is building into ${engine_dir}: waiting for it" >&2
        flock 9
    fi
fi
# The build runs as a child so that a SIGTERM during a long build stops it (bash as PID 1 would
# otherwise ignore the signal until the kill).
# shellcheck disable=SC2086  # TRIDENT_BUILD_ARGS is a list of flags
python3 "${here}/build/build_engine.py" --model-dir "${model_dir}" --out "${engine_dir}" \
    --skip-existing ${TRIDENT_BUILD_ARGS:-} &
child=$!
trap 'echo "[entrypoint] stopping the engine build" >&2; kill -TERM "${child}" 2>/dev/null; wait "${child}"; exit 143' TERM INT
wait "${child}"
trap - TERM INT
exec 9>&-  # release the lock: Triton must not hold it

exec python3 "${here}/scripts/launch_triton_gpu.py" --model-repository "${engine_dir}/model_repository" "$@"
