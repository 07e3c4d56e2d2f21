"""Kubernetes manifests: every overlay renders (kubectl kustomize), every object validates against
the Kubernetes schemas (kubernetes-validate), and the invariants that break a deployment silently
hold: probes and ports match Triton's endpoints and the entrypoint's flags, the drain fits in the
grace period, selectors select, and the metrics the autoscaler and dashboard query are ones a
real tritonserver exports."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from search_rank_client import SearchClient
from conversion.stages import REPO_ROOT
from deploy import dashboard
from deploy.entrypoint import parse_args
from model_repository import spec
from model_repository.triton_server import TritonPorts, TritonSettings

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
# Oldest and newest Kubernetes the objects must be valid for (autoscaling/v2 and policy/v1 are GA
# since 1.23/1.21; 1.29 is the oldest release still common on managed clusters).
K8S_VERSIONS = ("1.29.0", "1.37.0")
# Custom resources: no schema in kubernetes-validate (it knows only built-in kinds); their fields
# are checked by the structural tests below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
READY_PATH = f"/v2/models/{spec.SEARCH_RANK}/ready"
# Triton's own metrics and the query encoder's custom cache counter
METRIC = re.compile(r"\b((?:nv|searchrank_embedding)_[a-z_]+)\b")


@pytest.fixture(scope="module")
def rendered(require_tool) -> dict[str, list[dict]]:
    kubectl = require_tool("kubectl")
    out = {}
    for overlay in OVERLAYS:
        r = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        out[overlay] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return out


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} objects"
    return found[0]


def _container(docs) -> dict:
    (c,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


# ---- render + schema -------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(rendered, overlay):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered[overlay])
    assert kinds == sorted([
        ("ConfigMap", "search-rank-dashboard"), ("Deployment", "search-rank"),
        ("HorizontalPodAutoscaler", "search-rank"), ("PodDisruptionBudget", "search-rank"),
        ("Service", "search-rank"), ("Service", "search-rank-grpc"), ("ServiceMonitor", "search-rank")])
    assert {d["metadata"].get("namespace") for d in rendered[overlay]} == {"search"}


@pytest.mark.unit
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(rendered, overlay, version):
    import kubernetes_validate

    checked = 0
    for doc in rendered[overlay]:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:  # strict: an unknown (misspelt) field is an error, not silently dropped by the API server
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay} {doc['kind']}/{doc['metadata']['name']} on {version}: {e.message} at "
                        f"{'/'.join(map(str, e.path))}")
        checked += 1
    assert checked == len(rendered[overlay]) - len(CRD_KINDS)


@pytest.mark.unit
def test_schema_validation_catches_a_misspelt_field(rendered):
    import kubernetes_validate

    bad = json.loads(json.dumps(_one(rendered["gpu"], "Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": READY_PATH, "port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


# ---- probes, ports, drain ---------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_triton_endpoints_on_the_served_ports(rendered, overlay):
    c = _container(rendered[overlay])
    settings, _ = parse_args(c["args"])  # the manifest's args must be valid entrypoint input
    assert settings.target == overlay
    assert settings.host == "0.0.0.0", "probes and Services reach the pod IP, not loopback"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings.ports.http, "grpc": settings.ports.grpc, "metrics": settings.ports.metrics}
    for probe, path in (("startupProbe", READY_PATH), ("readinessProbe", READY_PATH)):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == settings.ports.http, f"{probe} is not on Triton's HTTP port"
    # liveness: the deep probe, on the same port and the repository the entrypoint renders
    probe_args = _liveness_args(c)
    assert probe_args.http_url == f"http://127.0.0.1:{settings.ports.http}"
    assert probe_args.repository == settings.repository
    assert probe_args.server_pid == 1, "tritonserver is PID 1 (the entrypoint execs it)"


def _liveness_args(container: dict):
    """The liveness exec command, parsed by deploy.probe's own parser (so it must be valid input)."""
    from deploy import probe

    command = container["livenessProbe"]["exec"]["command"]
    assert command[:3] == ["python3", "-m", "deploy.probe"], command
    return probe.build_parser().parse_args(command[3:])


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_and_triton_drain(rendered, overlay):
    pod = _one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    c = _container(rendered[overlay])
    settings, _ = parse_args(c["args"])
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + settings.exit_timeout_s


@pytest.mark.unit
def test_startup_budget_allows_an_engine_build_on_gpu(rendered):
    def budget(overlay):
        p = _container(rendered[overlay])["startupProbe"]
        return p["periodSeconds"] * p["failureThreshold"]

    assert budget("cpu") >= TritonSettings(repository=Path(".")).startup_timeout_s
    assert budget("gpu") >= 15 * 60 and budget("gpu") > budget("cpu")


@pytest.mark.unit
def test_gpu_overlay_requests_a_gpu_node_and_caches_engines_there(rendered):
    gpu = _one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]
    assert _container(rendered["gpu"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    engines = next(v for v in gpu["volumes"] if v["name"] == "engines")
    assert "hostPath" in engines and "emptyDir" not in engines
    mount = next(m for m in _container(rendered["gpu"])["volumeMounts"] if m["name"] == "engines")
    assert mount["mountPath"] == str(parse_args(_container(rendered["gpu"])["args"])[0].engine_cache)
    cpu = _one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu)


def _pod_user(docs) -> tuple[int, int]:
    ctx = _one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    return ctx["runAsUser"], ctx["runAsGroup"]


@pytest.mark.unit
def test_gpu_engine_cache_is_made_the_servers_before_it_starts(rendered):
    """fsGroup does not apply to hostPath; an init container must hand the folder to the server's uid."""
    pod = _one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in _container(rendered["gpu"])["volumeMounts"] if m["name"] == "engines")
    (init,) = pod["initContainers"]
    (init_mount,) = [m for m in init["volumeMounts"] if m["name"] == "engines"]
    ctx = init["securityContext"]
    assert ctx["runAsUser"] == 0 and ctx["runAsNonRoot"] is False and not ctx["allowPrivilegeEscalation"]
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]} and ctx["readOnlyRootFilesystem"]
    assert init["image"] == _container(rendered["gpu"])["image"], "no second image to pull on a GPU node"
    uid, gid = _pod_user(rendered["gpu"])
    script = init["command"][-1]
    assert init["command"][:2] == ["sh", "-c"] and f"chown {uid}:{gid} {init_mount['mountPath']}" in script
    assert init_mount["mountPath"] == mount["mountPath"]
    assert "-R" not in script, "the plans inside are the server's already; a recursive chown would walk them"


@pytest.mark.unit
def test_gpu_engine_cache_init_command_really_hands_over_the_folder(rendered, tmp_path):
    # The manifest's own command, on a root-owned folder like the kubelet's DirectoryOrCreate, twice
    # (a restart runs it again), then the server's uid writes into it as the entrypoint would.
    if os.geteuid() != 0:
        pytest.skip("needs root to create a root-owned folder and chown it")
    (init,) = _one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]["initContainers"]
    (mount,) = [m["mountPath"] for m in init["volumeMounts"] if m["name"] == "engines"]
    import tempfile

    # Not under tmp_path: pytest's root is 0700, which uid 10001 could not traverse to reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="engine-cache-", dir="/tmp")) / "hostpath"
    folder.parent.chmod(0o755)
    folder.mkdir()
    os.chown(folder, 0, 0)
    uid, gid = _pod_user(rendered["gpu"])
    for _ in range(2):
        r = subprocess.run(["sh", "-c", init["command"][-1].replace(mount, str(folder))], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        st = folder.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o750)
    try:
        r = subprocess.run(["sh", "-c", f"touch {folder}/plan"], user=uid, group=gid, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        import shutil

        shutil.rmtree(folder.parent)


@pytest.mark.unit
def test_gpu_pod_sizes_its_cpu_steps_from_its_cpu_request(rendered):
    from deploy import gpu_pod

    c = _container(rendered["gpu"])
    (env,) = [e for e in c["env"] if e["name"] == gpu_pod.CPUS_ENV]
    assert env["valueFrom"]["resourceFieldRef"] == {"containerName": c["name"], "resource": "requests.cpu",
                                                    "divisor": "1"}
    cpus = int(c["resources"]["requests"]["cpu"])
    sizing = gpu_pod.size_for_cpus(cpus)
    used = 1 + sizing.tokenizer_instances + sizing.ranker_instances * sizing.ranker_threads
    assert cpus - 1 <= used <= cpus + 1, f"{sizing} uses {used} of {cpus} CPUs"
    assert min(sizing.tokenizer_instances, sizing.ranker_instances) > 1, \
        "a GPU pod must not keep the 2-core CPU target's single instances"
    assert sizing.plan_instances == 2
    settings, _ = parse_args(c["args"])
    assert settings.cpus is None, "the Downward API's value, not a number in the args that could drift"


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runs_non_root_read_only(rendered, overlay):
    pod = _one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    c = _container(rendered[overlay])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    writable = {m["mountPath"] for m in c["volumeMounts"]}
    settings, _ = parse_args(c["args"])
    assert str(settings.repository.parent) in writable and "/tmp" in writable and "/dev/shm" in writable
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


# ---- services, monitor, disruption, autoscaling -----------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_and_name_real_ports(rendered, overlay):
    docs = rendered[overlay]
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in _container(docs)["ports"]}
    main, headless = _one(docs, "Service", "search-rank"), _one(docs, "Service", "search-rank-grpc")
    for svc in (main, headless):
        assert _matches(svc["spec"]["selector"], pod_labels)
        assert all(p["targetPort"] in container_ports for p in svc["spec"]["ports"])
    d = TritonPorts()
    assert {p["name"]: p["port"] for p in main["spec"]["ports"]} == {"http": d.http, "grpc": d.grpc,
                                                                     "metrics": d.metrics}
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in headless["spec"]["ports"]] == [d.grpc]


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_metrics_port_once(rendered, overlay):
    docs = rendered[overlay]
    sm = _one(docs, "ServiceMonitor")
    selected = [s for s in docs if s["kind"] == "Service" and _matches(sm["spec"]["selector"]["matchLabels"],
                                                                       s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["search-rank"], "each pod must be scraped exactly once"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_and_hpa_fit_together(rendered, overlay):
    docs = rendered[overlay]
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb, hpa = _one(docs, "PodDisruptionBudget"), _one(docs, "HorizontalPodAutoscaler")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # A drain may evict a pod only if one stays: maxUnavailable below the HPA's floor.
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "search-rank"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == _adapter_rule()["name"]["as"]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] > 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]


@pytest.mark.unit
def test_autoscaling_signal_is_queue_time_per_ensemble_request():
    rule = _adapter_rule()
    query = rule["metricsQuery"]
    numerator, denominator = query.split("/", 1)
    assert "nv_inference_queue_duration_us" in numerator and "nv_inference_request_success" in denominator
    (models,) = re.findall(r'model=~"([^"]+)"', query)
    assert set(models.split("|")) == {e for e in dashboard.ENSEMBLES} == {spec.SEARCH_RANK, spec.TEXT_EMBED}
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]


# ---- dashboard ----------------------------------------------------------------------------------

def _dashboard_queries() -> list[str]:
    board = json.loads(dashboard.DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]] + \
        [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]


@pytest.mark.unit
def test_committed_dashboard_is_generated_from_the_spec(rendered):
    assert dashboard.DASHBOARD.read_text() == dashboard.render(), "run python -m deploy.dashboard"
    cm = _one(rendered["gpu"], "ConfigMap", "search-rank-dashboard")
    assert json.loads(cm["data"]["search-rank.json"]) == dashboard.dashboard()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.unit
def test_dashboard_queries_only_spec_models():
    known = {m for m in (*dashboard.ENSEMBLES, *dashboard.STEPS)}
    assert set(dashboard.STEPS) == {m.name for t in spec.TARGETS for m in spec.build_spec(8, target=t).models}
    for expr in _dashboard_queries():
        for group in re.findall(r'model=~"([^"]+)"', expr):
            assert set(group.split("|")) <= known, expr


# ---- against the real server ------------------------------------------------------------------

def _exported_metrics(url: str) -> set[str]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


@pytest.mark.server
def test_queried_metrics_are_exported_by_a_real_server(triton):
    with SearchClient(triton.grpc_url, timeout_s=30) as c:
        for _ in range(5):
            c.rank("trail running shoes", 7, list(range(1, 101)), top_k=10)
        c.embed("trail running shoes")
    exported = _exported_metrics(triton.metrics_url)
    used = set(METRIC.findall(_adapter_rule()["metricsQuery"] + _adapter_rule()["seriesQuery"]))
    used |= {m for q in _dashboard_queries() for m in METRIC.findall(q)}
    assert used - exported - set(dashboard.GPU_ONLY_METRICS) == set(), "queried but not exported"
    # The GPU-only list must stay honest: all nv_gpu_*, none exported by this CPU server.
    assert all(m.startswith("nv_gpu_") for m in dashboard.GPU_ONLY_METRICS)
    assert not exported & set(dashboard.GPU_ONLY_METRICS)
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= used


@pytest.mark.server
def test_autoscaling_signal_from_real_counters(triton):
    """The adapter's ratio, computed from one server's counters: queue time per ensemble request."""
    def counters():
        text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
        queue = sum(float(v) for k, v in re.findall(r'^nv_inference_queue_duration_us\{([^}]*)\} (\S+)', text, re.M))
        done = sum(float(v) for labels, v in re.findall(r'^nv_inference_request_success\{([^}]*)\} (\S+)', text, re.M)
                   if re.search(rf'model="({spec.SEARCH_RANK}|{spec.TEXT_EMBED})"', labels))
        return queue, done

    q0, n0 = counters()
    with SearchClient(triton.grpc_url, timeout_s=30) as c:
        for _ in range(10):
            c.rank("desk lamp", 3, list(range(1, 201)))
    q1, n1 = counters()
    assert n1 - n0 == 10
    per_request = (q1 - q0) / (n1 - n0)
    assert 0 < per_request < 10_000_000, per_request  # some queueing in the steps, never 10 s


@pytest.mark.server
def test_probe_paths_answer_on_a_real_server(rendered, triton):
    c = _container(rendered["gpu"])
    for probe in ("startupProbe", "readinessProbe"):
        url = f"http://{triton.settings.host}:{triton.settings.ports.http}{c[probe]['httpGet']['path']}"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200, probe
    # the liveness command as written, pointed at this server instead of the pod's PID 1
    command = c["livenessProbe"]["exec"]["command"]
    args = [a for a in command[3:] if not a.startswith(("--http-url", "--repository"))]
    r = subprocess.run([sys.executable, "-m", "deploy.probe", *args, f"--server-pid={triton.process.pid}",
                        f"--http-url={triton.http_url}", f"--repository={triton.settings.repository}"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("live:"), r.stderr


# ---- item-encoding RayJob (deploy/k8s/rayjob) --------------------------------------------------
# kubernetes-validate knows no CRDs: the RayJob is checked against a subset of KubeRay's own RayJob
# schema (tests/deploy/schemas, generated from the CRD), its pod templates as real Pods, and its
# entrypoint with conversion.encode_items' own parser.

RAYJOB = K8S / "rayjob"
RAYJOB_SCHEMA = Path(__file__).parent / "schemas" / "rayjob-v1.schema.json"
DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def rayjob_docs(require_tool) -> list[dict]:
    r = subprocess.run([require_tool("kubectl"), "kustomize", str(RAYJOB)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _entrypoint(rayjob: dict):
    import shlex

    from conversion import encode_items

    command = shlex.split(rayjob["spec"]["entrypoint"])
    assert command[:3] == ["python3", "-m", "conversion.encode_items"], command
    return encode_items.build_parser().parse_args(command[3:])  # must be valid input to the real CLI


def _pods(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}


def _mounts(template: dict) -> set[str]:
    (c,) = template["spec"]["containers"]
    return {m["mountPath"] for m in c.get("volumeMounts", [])}


@pytest.mark.unit
def test_rayjob_renders_the_job_and_its_volume(rayjob_docs):
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rayjob_docs) == [
        ("PersistentVolumeClaim", "item-catalog"), ("RayJob", "item-encoding")]
    assert {d["metadata"]["namespace"] for d in rayjob_docs} == {"search"}
    assert _one(rayjob_docs, "RayJob")["apiVersion"] == "ray.io/v1"


@pytest.mark.unit
def test_rayjob_validates_against_kuberay_schema(rayjob_docs):
    import jsonschema

    schema = json.loads(RAYJOB_SCHEMA.read_text())
    rayjob = _one(rayjob_docs, "RayJob")
    jsonschema.validate(rayjob, schema)
    bad = json.loads(json.dumps(rayjob))
    bad["spec"]["shutdownAfterJobFinish"] = True  # misspelt: KubeRay would silently prune it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(rayjob))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.unit
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayjob_pods_and_volume_validate_as_kubernetes_objects(rayjob_docs, version):
    import kubernetes_validate

    rayjob = _one(rayjob_docs, "RayJob")
    objects = [_one(rayjob_docs, "PersistentVolumeClaim")] + [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"item-encoding-{group}"}, "spec": t["spec"]}
        for group, t in _pods(rayjob).items()]
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {e.message} at "
                        f"{'/'.join(map(str, e.path))}")


@pytest.mark.unit
def test_rayjob_runs_the_encoder_on_the_serving_image(rayjob_docs, rendered):
    from deploy.bundle import ENCODER_DIR

    rayjob = _one(rayjob_docs, "RayJob")
    args = _entrypoint(rayjob)
    serving_image = _container(rendered["cpu"])["image"]
    for group, template in _pods(rayjob).items():
        (c,) = template["spec"]["containers"]
        assert c["image"] == serving_image, group
        assert template["spec"]["securityContext"]["runAsUser"] != 0
    # The served encoder the image carries, not a profile build (the image has no torch).
    (bundle,) = re.findall(r"SEARCHRANK_BUNDLE=(\S+)", DOCKERFILE.read_text())
    assert args.encoder_dir == Path(bundle) / ENCODER_DIR
    assert args.address is None, "KubeRay sets RAY_ADDRESS for the job's driver"
    # Workers read the input; the driver (on the head) commits the outputs: both on the shared volume.
    pods = _pods(rayjob)
    for path in (Path(args.input), args.output):
        for group, template in pods.items():
            assert any(path.is_relative_to(m) for m in _mounts(template)), f"{path} is not mounted in {group}"
    assert {v["persistentVolumeClaim"]["claimName"] for t in pods.values() for v in t["spec"]["volumes"]
            if "persistentVolumeClaim" in v} == {_one(rayjob_docs, "PersistentVolumeClaim")["metadata"]["name"]}
    assert all("/dev/shm" in _mounts(t) for t in pods.values()), "Ray's object store needs a real /dev/shm"


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.unit
def test_rayjob_workers_have_exactly_the_actors_cpus(rayjob_docs):
    rayjob = _one(rayjob_docs, "RayJob")
    args = _entrypoint(rayjob)
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], "a fixed pool: no autoscaler"
    (c,) = group["template"]["spec"]["containers"]
    cpus = _cpus(c["resources"]["limits"]["cpu"])
    assert _cpus(c["resources"]["requests"]["cpu"]) == cpus, "Guaranteed CPUs for the ORT threads"
    assert cpus % args.threads_per_actor == 0, "whole actors per worker"
    assert group["replicas"] * cpus == args.actors * args.threads_per_actor
    assert c["resources"]["limits"]["memory"] and "nvidia.com/gpu" not in json.dumps(c) and args.gpus_per_actor == 0
    head_cpus = float(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"])
    assert 0 < head_cpus < args.threads_per_actor, "reads may run on the head, actors may not"


@pytest.mark.unit
def test_rayjob_cleans_up_and_matches_the_image_ray(rayjob_docs):
    import ray

    spec = _one(rayjob_docs, "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    requirements = (REPO_ROOT / "deploy" / "docker" / "requirements.txt").read_text()
    assert f"ray[data]=={spec['rayClusterSpec']['rayVersion']}" in requirements.splitlines()
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__, "the tested Ray is the one the cluster runs"
