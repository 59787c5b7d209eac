# trident's REST gateway (Flask + gevent under gunicorn): no model, no torch, no Triton inside.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t trident-gateway:latest .
#   docker run --rm -p 8080:8080 -e TRIDENT_TRITON_GRPC_URL=<triton-host>:8001 \
#       -e TRIDENT_API_KEYS_FILE=/run/secrets/api_keys.json \
#       -v "$PWD/deploy/secrets/api_keys.json:/run/secrets/api_keys.json:ro" trident-gateway:latest
#
# Settings (environment):
#   GATEWAY_HOST, GATEWAY_PORT     where gunicorn listens (0.0.0.0, 8080)
#   GATEWAY_WORKERS                gevent worker processes, each holding many streams (2)
#   GATEWAY_DRAIN_TIMEOUT          seconds open streams get to finish after SIGTERM; /readyz turns
#                                  503 at once (30). Give the container a stop timeout longer than it.
#   TRIDENT_TRITON_GRPC_URL        host:port, a comma-separated list of them, or dns:///name:port
#                                  (all addresses of a name, e.g. a Kubernetes headless Service);
#                                  the gateway balances over them with gRPC's round_robin
#   TRIDENT_API_KEYS_FILE          JSON keys file (hashes only; docs/operations.md)
#   TRIDENT_RATELIMIT_STORAGE_URI  redis://redis:6379/0 to share rate limits between workers/replicas
#   TRIDENT_TOKENIZER_DIR          optional: a tokenizer folder, for chat templates
# Endpoints: /healthz (liveness), /readyz (readiness: 503 while no Triton is ready or while
# draining), /metrics (Prometheus), on GATEWAY_PORT.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what setup.py packages: the gateway's dependencies are install_requires; the [cpu] extra
# (torch, the tritonserver wheel, transformers) is for the Triton image, not this one.
WORKDIR /src
COPY setup.py ./
COPY gateway/ gateway/
COPY trident/ trident/
RUN pip install . \
 && cd / && rm -rf /src \
 && python -c "import gateway, gunicorn, gevent, grpc, tritonclient.grpc; print('gateway ok')"

# Non-root. gunicorn_conf keeps the workers' metrics in a private folder under /tmp (an emptyDir
# in Kubernetes, where the root filesystem is read-only).
RUN groupadd --system --gid 10001 trident \
 && useradd --system --uid 10001 --gid trident --home-dir /home/trident --create-home --shell /usr/sbin/nologin trident
USER 10001:10001
WORKDIR /home/trident

ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_WORKERS=2 \
    GATEWAY_DRAIN_TIMEOUT=30 \
    TRIDENT_TRITON_GRPC_URL=triton:8001 \
    TRIDENT_LOG_FORMAT=json
EXPOSE 8080

# Liveness only: /readyz is for load balancers (it is 503 while no Triton is ready, which is not
# a reason to restart the gateway). With GATEWAY_CERTFILE/GATEWAY_KEYFILE the gateway serves HTTPS
# only: override this check (docker run --health-cmd ...).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=4)"]

# gunicorn is PID 1 and gets SIGTERM itself: the config drains (GATEWAY_DRAIN_TIMEOUT), picks the
# gevent + gRPC worker class (gateway.worker.GeventGrpcWorker) and reads GATEWAY_* above.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "python:gateway.gunicorn_conf", "gateway:create_app()"]
