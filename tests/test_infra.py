"""Static checks of the deployment files in infra/ and of docs/cluster.md.

Nothing here builds an image or starts a cluster. The files are parsed and checked for what a
deployment relies on: schema keys, image tags that match the package and Ray versions, token
auth, dashboards on loopback, ClusterIP services, and no secret written in a file. Each checker
returns a list of problems; every checker also runs on deliberately broken copies, to prove
that it notices.
"""

from __future__ import annotations

import configparser
import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILES = {"cpu": INFRA / "docker/Dockerfile.cpu", "cuda": INFRA / "docker/Dockerfile.cuda"}
LAUNCHER = INFRA / "ray/cluster-aws.yaml"
RAYCLUSTER = INFRA / "kuberay/raycluster.yaml"
RAYJOB = INFRA / "kuberay/rayjob-sweep.yaml"
COMPOSE = INFRA / "mlflow/docker-compose.yaml"
MLFLOW_K8S = INFRA / "mlflow/k8s.yaml"
SBATCH = INFRA / "slurm/capi-sweep.sbatch"
DOCS = ROOT / "docs/cluster.md"
# Not deployment files: the local set-up script, and the git-ignored .env that holds real secrets.
DEPLOY_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name not in ("setup.sh", ".env"))

# Top-level keys of Ray 2.60's cluster-launcher schema (ray/autoscaler/ray-schema.json).
LAUNCHER_KEYS = {
    "cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers",
    "upscaling_speed", "idle_timeout_minutes", "docker", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "metadata",
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands", "no_restart",
}
LAUNCHER_REQUIRED = {
    "cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers",
    "docker", "file_mounts", "head_start_ray_commands", "worker_start_ray_commands",
}

OUR_IMAGE = re.compile(r"capi-orchestrator:([\w.+-]+)")
RAY_IMAGE = re.compile(r"rayproject/ray:([\w.+-]+)")
SECRET_WORD = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|credential", re.I)
COMPOSE_REQUIRED_VAR = re.compile(r"^\$\{\w+:\?[^}]*\}$")
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
ENTRYPOINT = re.compile(r"^capi sweep run \S*sweeps/[\w.-]+\.ya?ml$")
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------------------
# Facts the files must agree with
# ------------------------------------------------------------------------------------------

def package_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        instruction, _, args = (current + line).partition(" ")
        instructions.append((instruction.upper(), " ".join(args.split())))
        current = ""
    return instructions


def ray_version() -> str:
    """The Ray the images run: `ARG RAY_VERSION=...` of Dockerfile.cpu; every file follows it."""
    for instruction, args in parse_dockerfile(DOCKERFILES["cpu"].read_text()):
        if instruction == "ARG" and args.startswith("RAY_VERSION="):
            return args.partition("=")[2]
    raise AssertionError(f"{DOCKERFILES['cpu']} has no `ARG RAY_VERSION=...`")


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dig(node, *keys, default=None):
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


# ------------------------------------------------------------------------------------------
# Checkers shared by all files
# ------------------------------------------------------------------------------------------

def image_tag_problems(text: str, version: str, ray: str) -> list[str]:
    """Our image is tagged <package version>-cpu|-cuda; Ray's image is tagged <ray version>-..."""
    problems = [
        f"capi-orchestrator:{tag} should be {version}-cpu or {version}-cuda"
        for tag in OUR_IMAGE.findall(text)
        if tag not in (f"{version}-cpu", f"{version}-cuda")
    ]
    problems += [
        f"rayproject/ray:{tag} is not Ray {ray}"
        for tag in RAY_IMAGE.findall(text)
        if tag != ray and not tag.startswith(f"{ray}-")
    ]
    return problems


def is_secret_name(name: str) -> bool:
    """An identifier that names a secret (a path or a file holding one does not)."""
    return (
        re.fullmatch(r"[A-Za-z_][\w.-]*", name) is not None
        and SECRET_WORD.search(name) is not None
        and re.search(r"(_path|_file|name|ref)$", name, re.I) is None
    )


def literal_secret_problems(text: str) -> list[str]:
    """Shell/env-file style NAME=value with a literal secret, keys, or passwords in URLs."""
    problems = []
    for match in re.finditer(r"(?=\b([A-Za-z_][\w-]*)=([^\s=]*))", text):
        name, value = match.groups()
        # A value may be a reference ($VAR, $(cmd)), a <placeholder> or a file that holds it.
        reference = value.startswith(("$", "<", '"$', "'$", "./", "/", "~/"))
        if is_secret_name(name) and value and not reference:
            problems.append(f"literal secret {name}={value}")
    if URL_WITH_PASSWORD.search(text):
        problems.append("a URL with a password in it")
    if re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|AKIA[0-9A-Z]{16}", text):
        problems.append("a private key or an AWS access key id")
    return problems


def yaml_secret_problems(node, where: str = "") -> list[str]:
    """Secret-named keys and env entries must hold references, not values.

    Compose: `${VAR:?message}` (the value comes from .env and must be set). Kubernetes env
    entries: `valueFrom`, never `value`. Anything else with a secret name is a literal.
    """
    problems = []
    if isinstance(node, dict):
        name, value = node.get("name"), node.get("value")
        if isinstance(name, str) and is_secret_name(name) and isinstance(value, str):
            problems.append(f"{where}: env {name} has a literal value, use valueFrom")
        for key, child in node.items():
            here = f"{where}.{key}"
            if isinstance(child, str):
                if is_secret_name(str(key)) and not COMPOSE_REQUIRED_VAR.match(child):
                    problems.append(f"{here}: literal secret (use ${{VAR:?...}} or a Secret)")
                if URL_WITH_PASSWORD.search(child):
                    problems.append(f"{here}: URL with a password")
            else:
                problems += yaml_secret_problems(child, here)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            here = f"{where}[{i}]"
            pair = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", child) if isinstance(child, str) else None
            if pair and is_secret_name(pair[1]) and not COMPOSE_REQUIRED_VAR.match(pair[2]):
                problems.append(f"{here}: literal secret {pair[1]}")
            problems += yaml_secret_problems(child, here)
    return problems


def auth_and_dashboard_problems(text: str) -> list[str]:
    """Token auth never turned off; every dashboard host that is set is the loopback."""
    problems = []
    if re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled|mode:\s*['\"]?disabled", text):
        problems.append("token auth disabled")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", text)
    hosts += re.findall(r"dashboard-host:\s*['\"]?([^'\"\s]+)", text)
    problems += [f"dashboard bound to {host}" for host in hosts if host != LOOPBACK]
    return problems


def containers(pod_template: dict) -> list[dict]:
    return dig(pod_template, "spec", "containers", default=[]) or []


# ------------------------------------------------------------------------------------------
# Per-kind checkers
# ------------------------------------------------------------------------------------------

def raycluster_spec_problems(spec: dict, where: str, ray: str) -> list[str]:
    """A RayClusterSpec (RayCluster.spec or RayJob.spec.rayClusterSpec)."""
    problems = []
    if spec.get("rayVersion") != ray:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not {ray!r}")
    if dig(spec, "authOptions", "mode") != "token":
        problems.append(f"{where}: authOptions.mode is not token")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or not containers(head.get("template")):
        return problems + [f"{where}: headGroupSpec with a pod template is missing"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}: head service exposed ({head.get('serviceType')})")
    host = dig(head, "rayStartParams", "dashboard-host")
    if host is not None and host != LOOPBACK:
        problems.append(f"{where}: dashboard-host {host}")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}: workerGroupSpecs is empty")
    gpu_containers = 0
    for group in [head, *groups]:
        name = group.get("groupName", "head")
        if not containers(group.get("template")):
            problems.append(f"{where}: group {name} has no containers")
        for c in containers(group.get("template")):
            image = c.get("image", "")
            requests = dig(c, "resources", "requests", default={}) or {}
            gpu = "nvidia.com/gpu" in (dig(c, "resources", "limits", default={}) or {})
            gpu_containers += gpu
            if not OUR_IMAGE.search(image):
                problems.append(f"{where}: group {name} runs {image!r}, not our image")
            elif image.endswith("-cuda") != gpu:
                problems.append(f"{where}: group {name}: GPU limit and -cuda image disagree")
            if not {"cpu", "memory"} <= set(requests):
                problems.append(f"{where}: group {name} has no cpu/memory requests")
    if not gpu_containers:
        problems.append(f"{where}: no GPU worker group (limits nvidia.com/gpu)")
    return problems


def raycluster_problems(doc: dict, ray: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayCluster":
        problems.append("not a ray.io/v1 RayCluster")
    if not dig(doc, "metadata", "name"):
        problems.append("metadata.name is missing")
    return problems + raycluster_spec_problems(doc.get("spec") or {}, "spec", ray)


def rayjob_problems(doc: dict, ray: str) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append("not a ray.io/v1 RayJob")
    spec = doc.get("spec") or {}
    if not ENTRYPOINT.match(spec.get("entrypoint") or ""):
        problems.append(f"entrypoint {spec.get('entrypoint')!r} is not `capi sweep run sweeps/...`")
    if "rayClusterSpec" in spec:
        problems += raycluster_spec_problems(spec["rayClusterSpec"], "rayClusterSpec", ray)
    elif "clusterSelector" not in spec:
        problems.append("neither rayClusterSpec nor clusterSelector")
    return problems


def launcher_problems(cfg: dict) -> list[str]:
    problems = [f"unknown top-level key {k!r}" for k in sorted(set(cfg) - LAUNCHER_KEYS)]
    problems += [f"missing top-level key {k!r}" for k in sorted(LAUNCHER_REQUIRED - set(cfg))]
    if dig(cfg, "provider", "type") != "aws":
        problems.append("provider.type is not aws")
    node_types = cfg.get("available_node_types") or {}
    if cfg.get("head_node_type") not in node_types:
        problems.append("head_node_type is not one of available_node_types")
    docker = cfg.get("docker") or {}
    images = [docker.get(k) for k in ("image", "head_image", "worker_image") if docker.get(k)]
    images += [dig(t, "docker", "worker_image") for t in node_types.values()]
    images = [image for image in images if image]
    if not images:
        problems.append("no docker image")
    problems += [f"image {i!r} is not ours" for i in images if not OUR_IMAGE.search(i)]
    if not any(str(target).endswith("/.ray/auth_token") for target in cfg.get("file_mounts") or {}):
        problems.append("the auth token is not mounted through file_mounts")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key) or [] if "ray start" in c]
        if not starts:
            problems.append(f"{key} never runs `ray start`")
        for command in starts:
            before = command.split("ray start")[0]
            if not re.search(r"\bRAY_AUTH_MODE=token\b", before):
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token before it")
    heads = [c for c in cfg.get("head_start_ray_commands") or [] if "--head" in c]
    if not any(f"--dashboard-host={LOOPBACK}" in c for c in heads):
        problems.append(f"head `ray start` lacks --dashboard-host={LOOPBACK}")
    return problems


def published_port_problems(ports: list) -> list[str]:
    """Short-syntax mappings whose host address (or its default) is the loopback."""
    problems = []
    for port in ports:
        m = re.fullmatch(r"(?:\$\{\w+:-([\d.]+)\}|([\d.]+)):\d+:\d+", str(port))
        if not m or (m[1] or m[2]) != LOOPBACK:
            problems.append(f"port {port!r} is not bound to {LOOPBACK}")
    return problems


def compose_problems(doc: dict) -> list[str]:
    services = doc.get("services") or {}
    if not services:
        return ["no services"]
    problems = []
    for name, service in services.items():
        if not isinstance(service.get("image"), str) or "build" in service:
            problems.append(f"service {name} has no image (or builds one)")
        ports = published_port_problems(service.get("ports") or [])
        problems += [f"service {name}: {p}" for p in ports]
    if not any(str(s.get("image", "")).startswith("postgres:") for s in services.values()):
        problems.append("no PostgreSQL service")
    servers = [s for s in services.values() if {"mlflow", "server"} <= set(s.get("command", []))]
    if len(servers) != 1:
        return problems + ["no single `mlflow server` service"]
    server = servers[0]
    env = server.get("environment") or {}
    if "--app-name basic-auth" not in " ".join(server["command"]):
        problems.append("mlflow server runs without --app-name basic-auth")
    if str(env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")).lower() != "false":
        problems.append("MLFLOW_SERVER_ENABLE_JOB_EXECUTION is not false")
    if not str(env.get("MLFLOW_BACKEND_STORE_URI", "")).startswith("postgresql"):
        problems.append("backend store is not PostgreSQL")
    artifacts = str(env.get("MLFLOW_ARTIFACTS_DESTINATION", ""))
    if not artifacts.startswith("s3://") or not env.get("MLFLOW_S3_ENDPOINT_URL"):
        problems.append("artifacts are not on the S3 endpoint")
    return problems + yaml_secret_problems(doc, "compose")


def mlflow_k8s_problems(docs: list[dict]) -> list[str]:
    problems = []
    kinds = [d.get("kind") for d in docs]
    if not {"Deployment", "Service"} <= set(kinds):
        problems.append(f"kinds {kinds}: need a Deployment and a Service")
    for d in docs:
        if d.get("kind") == "Ingress":
            problems.append("an Ingress exposes MLflow")
        if d.get("kind") == "Secret" and (d.get("data") or d.get("stringData")):
            problems.append("a Secret with values in the manifest")
        if d.get("kind") == "Service" and dig(d, "spec", "type", default="ClusterIP") != "ClusterIP":
            problems.append(f"Service type {dig(d, 'spec', 'type')}, not ClusterIP")
    for d in docs:
        if d.get("kind") != "Deployment":
            continue
        for c in containers(dig(d, "spec", "template")):
            argv = " ".join([*(c.get("command") or []), *(c.get("args") or [])])
            env = {e["name"]: e for e in c.get("env") or []}
            if "--app-name basic-auth" not in argv:
                problems.append("mlflow server runs without --app-name basic-auth")
            if str(dig(env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value")).lower() != "false":
                problems.append("MLFLOW_SERVER_ENABLE_JOB_EXECUTION is not false")
            for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_S3_ENDPOINT_URL"):
                if not dig(env, name, "valueFrom", "secretKeyRef"):
                    problems.append(f"{name} does not come from a Secret")
    return problems + yaml_secret_problems(docs, "k8s")


def dockerfile_problems(text: str, flavour: str, version: str, ray: str) -> list[str]:
    instructions = parse_dockerfile(text)
    problems = []
    args = dict(a.partition("=")[::2] for i, a in instructions if i == "ARG" and "=" in a)
    if args.get("RAY_VERSION") != ray:
        problems.append(f"ARG RAY_VERSION={args.get('RAY_VERSION')} is not {ray}")
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), a)
             for i, a in instructions if i == "FROM"]
    platform = r"cpu" if flavour == "cpu" else r"(gpu|cu\d+)"
    base = rf"rayproject/ray:{re.escape(ray)}-py3\d+-{platform}"
    if len(froms) != 1 or not re.fullmatch(base, froms[0]):
        problems.append(f"FROM {froms} is not rayproject/ray:{ray}-py3XX-{platform}")
    envs = [a for i, a in instructions if i == "ENV"]
    if "RAY_AUTH_MODE=token" not in envs:
        problems.append("ENV RAY_AUTH_MODE=token is missing")
    problems += [f"secret in ENV/ARG: {a}" for i, a in instructions
                 if i in ("ENV", "ARG") and is_secret_name(re.split(r"[=\s]", a, maxsplit=1)[0])]
    users = [a for i, a in instructions if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"runs as root (USER {users[-1] if users else 'unset'})")
    labels = " ".join(a for i, a in instructions if i == "LABEL")
    if f'org.opencontainers.image.version="{version}"' not in labels:
        problems.append(f"LABEL org.opencontainers.image.version is not {version}")
    sources = [s for i, a in instructions if i in ("COPY", "ADD")
               for s in a.split()[:-1] if not s.startswith("--")]
    if "constraints.txt" not in sources:
        problems.append("constraints.txt is not copied in")
    secret_file = re.compile(r"\.env|auth_token|\.ray|\.aws|id_rsa|credential|\.pem")
    problems += [f"copies {s!r}: the whole context or a secret" for s in sources
                 if s in (".", "./") or secret_file.search(s)]
    installs = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    if not any("-c constraints.txt" in a and '"ray==${RAY_VERSION}"' in a for a in installs):
        problems.append("pip install does not use -c constraints.txt with ray==${RAY_VERSION}")
    if flavour == "cpu" and not any("download.pytorch.org/whl/cpu" in a for a in installs):
        problems.append("the CPU image does not install torch from the CPU wheel index")
    return problems


def sbatch_problems(text: str) -> list[str]:
    script = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    lines = [line.strip() for line in script.splitlines() if not line.strip().startswith("#")]

    def first(pattern: str) -> int | None:
        return next((n for n, line in enumerate(lines) if re.search(pattern, line)), None)

    problems = []
    auth, head = first(r"^export RAY_AUTH_MODE=token\b"), first(r"ray start --head")
    worker, sweep = first(r"ray start --address"), first(r"^capi sweep run\b")
    if auth is None or head is None or auth > head:
        problems.append("RAY_AUTH_MODE=token is not exported before the head starts")
    if head is None or f"--dashboard-host={LOOPBACK}" not in lines[head]:
        problems.append(f"head `ray start` lacks --dashboard-host={LOOPBACK}")
    if worker is None:
        problems.append("no worker `ray start --address`")
    if sweep is None or head is None or sweep < head:
        problems.append("`capi sweep run` does not follow the cluster start")
    if first(r"\bray stop\b") is not None:
        problems.append("`ray stop` would kill every Ray process of the user on the node")
    return problems


# ------------------------------------------------------------------------------------------
# The shipped files
# ------------------------------------------------------------------------------------------

def test_ray_version_is_one_that_pyproject_allows():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert ray_req.specifier.contains(ray_version())
    pins = re.findall(r"^ray(?:\[[^\]]*\])?==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert pins in ([], [ray_version()]), f"constraints.txt pins ray {pins}, images run {ray_version()}"


@pytest.mark.parametrize("path", DEPLOY_FILES + [DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_image_tags_and_secrets(path):
    text = path.read_text()
    assert image_tag_problems(text, package_version(), ray_version()) == []
    assert literal_secret_problems(text) == []


@pytest.mark.parametrize("path", [*DOCKERFILES.values(), LAUNCHER, RAYCLUSTER, RAYJOB, DOCS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_a_version_bump_would_flag_the_image_tags(path):
    """The tag check above is not vacuous: these files do name the image, with this version."""
    assert image_tag_problems(path.read_text(), "9.9.9", ray_version()) != []


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_token_auth_and_loopback_dashboard(path):
    assert auth_and_dashboard_problems(path.read_text()) == []


@pytest.mark.parametrize("path", [p for p in DEPLOY_FILES if p.suffix in (".yaml", ".yml")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_and_holds_no_secret(path):
    docs = load_yaml(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    assert yaml_secret_problems(docs, path.name) == []


@pytest.mark.parametrize("path", [p for p in DEPLOY_FILES if p.suffix == ".ini"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_ini_holds_no_secret(path):
    parser = configparser.ConfigParser()
    parser.read(path)
    assert [k for s in parser.sections() for k in parser[s] if is_secret_name(k)] == []


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile(flavour):
    text = DOCKERFILES[flavour].read_text()
    assert dockerfile_problems(text, flavour, package_version(), ray_version()) == []
    assert f"capi-orchestrator:{package_version()}-{flavour}" in text, "build command with the tag"


def test_cluster_launcher():
    assert launcher_problems(load_yaml(LAUNCHER)[0]) == []


def test_cluster_launcher_passes_rays_own_validation():
    """What `ray up` itself checks: defaults filled in, then the 2.60 JSON schema and more."""
    pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_yaml(LAUNCHER)[0]
    validate_config(prepare_config(copy.deepcopy(cfg)))
    broken = copy.deepcopy(cfg)  # a misspelt key: Ray would otherwise fill in its defaults
    broken["head_start_commands"] = broken.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_kuberay_raycluster():
    assert [raycluster_problems(d, ray_version()) for d in load_yaml(RAYCLUSTER)] == [[]]


def test_kuberay_rayjob():
    assert [rayjob_problems(d, ray_version()) for d in load_yaml(RAYJOB)] == [[]]


def test_mlflow_compose():
    assert compose_problems(load_yaml(COMPOSE)[0]) == []


def test_mlflow_kubernetes():
    assert mlflow_k8s_problems(load_yaml(MLFLOW_K8S)) == []


def test_slurm_script():
    assert sbatch_problems(SBATCH.read_text()) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------
# The checkers notice broken copies
# ------------------------------------------------------------------------------------------

def _set(path: tuple, value):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path: tuple):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


HEAD_CONTAINER = ("headGroupSpec", "template", "spec", "containers", 0)
GPU_CONTAINER = ("workerGroupSpecs", 1, "template", "spec", "containers", 0)

RAYCLUSTER_BREAKS = {
    "kind": (_set(("kind",), "RayService"), "not a ray.io/v1 RayCluster"),
    "ray version": (_set(("spec", "rayVersion"), "2.59.0"), "rayVersion"),
    "auth off": (_set(("spec", "authOptions", "mode"), "disabled"), "authOptions.mode"),
    "auth missing": (_delete(("spec", "authOptions")), "authOptions.mode"),
    "no head": (_delete(("spec", "headGroupSpec")), "headGroupSpec"),
    "no workers": (_set(("spec", "workerGroupSpecs"), []), "workerGroupSpecs is empty"),
    "load balancer": (_set(("spec", "headGroupSpec", "serviceType"), "LoadBalancer"), "exposed"),
    "dashboard": (
        _set(("spec", "headGroupSpec", "rayStartParams", "dashboard-host"), "0.0.0.0"), "dashboard-host"),
    "foreign image": (_set(("spec", *HEAD_CONTAINER, "image"), "rayproject/ray:2.60.0"), "not our image"),
    "no requests": (_delete(("spec", *HEAD_CONTAINER, "resources", "requests")), "requests"),
    "cpu image on gpu": (_set(("spec", *GPU_CONTAINER, "image"), "capi-orchestrator:0.1.0-cpu"), "disagree"),
    "no gpu group": (_delete(("spec", "workerGroupSpecs", 1)), "no GPU worker group"),
}


@pytest.mark.parametrize("case", sorted(RAYCLUSTER_BREAKS))
def test_raycluster_checker_catches(case):
    mutate, expected = RAYCLUSTER_BREAKS[case]
    doc = copy.deepcopy(load_yaml(RAYCLUSTER)[0])
    mutate(doc)
    assert any(expected in p for p in raycluster_problems(doc, ray_version())), case


RAYJOB_BREAKS = {
    "entrypoint": (_set(("spec", "entrypoint"), "python train.py"), "entrypoint"),
    "no cluster": (_delete(("spec", "rayClusterSpec")), "neither rayClusterSpec nor clusterSelector"),
    "auth off": (_delete(("spec", "rayClusterSpec", "authOptions")), "authOptions.mode"),
    "ray version": (_set(("spec", "rayClusterSpec", "rayVersion"), "2.61.0"), "rayVersion"),
}


@pytest.mark.parametrize("case", sorted(RAYJOB_BREAKS))
def test_rayjob_checker_catches(case):
    mutate, expected = RAYJOB_BREAKS[case]
    doc = copy.deepcopy(load_yaml(RAYJOB)[0])
    mutate(doc)
    assert any(expected in p for p in rayjob_problems(doc, ray_version())), case


def test_rayjob_may_use_an_existing_cluster():
    doc = copy.deepcopy(load_yaml(RAYJOB)[0])
    del doc["spec"]["rayClusterSpec"]
    doc["spec"]["clusterSelector"] = {"ray.io/cluster": "capi"}
    assert rayjob_problems(doc, ray_version()) == []


def _replace_in(key: str, old: str, new: str):
    def mutate(cfg):
        assert any(old in c for c in cfg[key]), f"{old!r} not in {key}"
        cfg[key] = [c.replace(old, new) for c in cfg[key]]
    return mutate


LAUNCHER_BREAKS = {
    "unknown key": (_set(("head_node",), "head"), "unknown top-level key 'head_node'"),
    "missing key": (_delete(("docker",)), "missing top-level key 'docker'"),
    "provider": (_set(("provider", "type"), "gcp"), "provider.type"),
    "head type": (_set(("head_node_type",), "nope"), "head_node_type"),
    "foreign image": (_set(("docker", "image"), "rayproject/ray:2.60.0-py311-cpu"), "is not ours"),
    "no token mount": (_set(("file_mounts",), {}), "auth token is not mounted"),
    "no auth on head": (
        _replace_in("head_start_ray_commands", "export RAY_AUTH_MODE=token &&", ""),
        "head_start_ray_commands"),
    "no auth on workers": (
        _replace_in("worker_start_ray_commands", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
        "worker_start_ray_commands"),
    "public dashboard": (
        _replace_in("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "--dashboard-host"),
}


@pytest.mark.parametrize("case", sorted(LAUNCHER_BREAKS))
def test_launcher_checker_catches(case):
    mutate, expected = LAUNCHER_BREAKS[case]
    cfg = copy.deepcopy(load_yaml(LAUNCHER)[0])
    mutate(cfg)
    assert any(expected in p for p in launcher_problems(cfg)), case


MLFLOW_ENV = ("services", "mlflow", "environment")
POSTGRES_ENV = ("services", "postgres", "environment")

COMPOSE_BREAKS = {
    "no auth app": (lambda d: d["services"]["mlflow"]["command"].remove("basic-auth"), "basic-auth"),
    "job runner": (_set((*MLFLOW_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"), "true"), "JOB_EXECUTION"),
    "sqlite": (_set((*MLFLOW_ENV, "MLFLOW_BACKEND_STORE_URI"), "sqlite:///mlflow.db"), "PostgreSQL"),
    "local artifacts": (_set((*MLFLOW_ENV, "MLFLOW_ARTIFACTS_DESTINATION"), "./mlartifacts"), "S3"),
    "built image": (_delete(("services", "s3", "image")), "has no image"),
    "literal password": (_set((*POSTGRES_ENV, "POSTGRES_PASSWORD"), "hunter2"), "literal secret"),
    "optional password": (
        _set((*POSTGRES_ENV, "POSTGRES_PASSWORD"), "${POSTGRES_PASSWORD:-x}"), "literal secret"),
    "password in url": (
        _set((*MLFLOW_ENV, "MLFLOW_BACKEND_STORE_URI"), "postgresql://mlflow:hunter2@postgres/mlflow"),
        "URL with a password"),
    "public port": (_set(("services", "mlflow", "ports"), ["5000:5000"]), "not bound to 127.0.0.1"),
    "public db": (_set(("services", "postgres", "ports"), ["0.0.0.0:5432:5432"]), "not bound to 127.0.0.1"),
}


@pytest.mark.parametrize("case", sorted(COMPOSE_BREAKS))
def test_compose_checker_catches(case):
    mutate, expected = COMPOSE_BREAKS[case]
    doc = copy.deepcopy(load_yaml(COMPOSE)[0])
    mutate(doc)
    assert any(expected in p for p in compose_problems(doc)), case


def _container(docs) -> dict:
    return docs[0]["spec"]["template"]["spec"]["containers"][0]


def _env(docs) -> list[dict]:
    return _container(docs)["env"]


def _env_entry(docs, name: str) -> dict:
    return next(e for e in _env(docs) if e["name"] == name)


def _literal_env(name: str, value: str):
    def mutate(docs):
        entry = _env_entry(docs, name)
        entry.pop("valueFrom", None)
        entry["value"] = value
    return mutate


MLFLOW_K8S_BREAKS = {
    "load balancer": (lambda d: d[1]["spec"].update(type="LoadBalancer"), "not ClusterIP"),
    "node port": (lambda d: d[1]["spec"].update(type="NodePort"), "not ClusterIP"),
    "no service": (lambda d: d.pop(1), "need a Deployment and a Service"),
    "ingress": (lambda d: d.append({"kind": "Ingress"}), "an Ingress"),
    "secret values": (
        lambda d: d.append({"kind": "Secret", "stringData": {"password": "x"}}), "a Secret with values"),
    "no auth app": (lambda d: _container(d)["args"].remove("basic-auth"), "basic-auth"),
    "literal db uri": (
        _literal_env("MLFLOW_BACKEND_STORE_URI", "postgresql://db/mlflow"), "does not come from a Secret"),
    "literal password": (_literal_env("PGPASSWORD", "hunter2"), "literal value"),
    "job runner": (_literal_env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true"), "JOB_EXECUTION"),
}


@pytest.mark.parametrize("case", sorted(MLFLOW_K8S_BREAKS))
def test_mlflow_k8s_checker_catches(case):
    mutate, expected = MLFLOW_K8S_BREAKS[case]
    docs = copy.deepcopy(load_yaml(MLFLOW_K8S))
    mutate(docs)
    assert any(expected in p for p in mlflow_k8s_problems(docs)), case


DOCKERFILE_BREAKS = {
    "ray version": ("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0", "RAY_VERSION"),
    "other base": ("FROM rayproject/ray:${RAY_VERSION}-py311-cpu", "FROM python:3.11-slim", "FROM"),
    "root": ("USER 1000:100", "USER root", "runs as root"),
    "no auth": ("ENV RAY_AUTH_MODE=token", "ENV RAY_AUTH_MODE=disabled", "RAY_AUTH_MODE"),
    "baked token": ("ENV RAY_AUTH_MODE=token", "ENV RAY_AUTH_MODE=token\nENV RAY_AUTH_TOKEN=abc", "secret in ENV"),
    "no constraints": ("-c constraints.txt", "", "constraints.txt"),
    "ray unpinned": ('"ray==${RAY_VERSION}" ', "", "ray==${RAY_VERSION}"),
    "whole context": ("COPY --chown=1000:100 sweeps ./sweeps", "COPY --chown=1000:100 . .", "whole context"),
    "dotenv": ("COPY --chown=1000:100 sweeps ./sweeps", "COPY .env ./", "secret"),
    "label version": ('image.version="0.1.0"', 'image.version="9.9.9"', "LABEL"),
    "cuda torch on cpu": ("--extra-index-url https://download.pytorch.org/whl/cpu", "", "CPU wheel index"),
}


@pytest.mark.parametrize("case", sorted(DOCKERFILE_BREAKS))
def test_dockerfile_checker_catches(case):
    old, new, expected = DOCKERFILE_BREAKS[case]
    text = DOCKERFILES["cpu"].read_text()
    assert old in text, f"{case}: {old!r} not in Dockerfile.cpu"
    problems = dockerfile_problems(text.replace(old, new), "cpu", package_version(), ray_version())
    assert any(expected in p for p in problems), (case, problems)


def test_dockerfile_checker_wants_a_cuda_base_for_cuda():
    text = DOCKERFILES["cuda"].read_text().replace("-py311-gpu", "-py311-cpu")
    problems = dockerfile_problems(text, "cuda", package_version(), ray_version())
    assert any("FROM" in p for p in problems)


SBATCH_BREAKS = {
    "no auth": ("export RAY_AUTH_MODE=token\n", "", "RAY_AUTH_MODE=token"),
    "public dashboard": ("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0", "--dashboard-host"),
    "no workers": ('ray start --address="$RAY_ADDRESS"', "true", "no worker"),
    "no sweep": ('capi sweep run "$sweep_file"', "true", "capi sweep run"),
    "ray stop": ('capi sweep run "$sweep_file"', 'capi sweep run "$sweep_file"\nray stop', "ray stop"),
}


@pytest.mark.parametrize("case", sorted(SBATCH_BREAKS))
def test_sbatch_checker_catches(case):
    old, new, expected = SBATCH_BREAKS[case]
    text = SBATCH.read_text()
    assert old in text, f"{case}: {old!r} not in the sbatch script"
    assert any(expected in p for p in sbatch_problems(text.replace(old, new))), case


@pytest.mark.parametrize("text, expected", [
    ("image: capi-orchestrator:0.0.9-cpu", "capi-orchestrator:0.0.9-cpu"),
    ("image: ghcr.io/x/capi-orchestrator:latest", "capi-orchestrator:latest"),
    ("image: rayproject/ray:2.59.0-py311-cpu", "rayproject/ray:2.59.0"),
])
def test_image_tag_checker_catches(text, expected):
    assert any(expected in p for p in image_tag_problems(text, "0.1.0", "2.60.0"))


@pytest.mark.parametrize("text, expected", [
    ("export RAY_AUTH_TOKEN=0123abcd", "RAY_AUTH_TOKEN"),
    ("MLFLOW_TRACKING_PASSWORD=hunter2", "MLFLOW_TRACKING_PASSWORD"),
    ("kubectl create secret generic x --from-literal=password=hunter2", "password"),
    ("postgresql://mlflow:hunter2@db/mlflow", "URL with a password"),
    ("key: AKIAABCDEFGHIJKLMNOP", "AWS access key"),
])
def test_literal_secret_checker_catches(text, expected):
    assert any(expected in p for p in literal_secret_problems(text))


@pytest.mark.parametrize("text", [
    "export RAY_AUTH_TOKEN=$(kubectl get secret capi --template={{.data.auth_token}} | base64 -d)",
    "export RAY_AUTH_TOKEN_PATH=~/.ray/auth_token",
    "POSTGRES_PASSWORD=",
    "MLFLOW_TRACKING_PASSWORD=<password of the sweeps user>",
])
def test_literal_secret_checker_accepts_references(text):
    assert literal_secret_problems(text) == []


@pytest.mark.parametrize("text", [
    "RAY_AUTH_MODE=disabled ray start --head",
    "authOptions:\n  mode: disabled",
    "ray start --head --dashboard-host=0.0.0.0",
    "rayStartParams:\n  dashboard-host: '0.0.0.0'",
])
def test_auth_and_dashboard_checker_catches(text):
    assert auth_and_dashboard_problems(text) != []
