"""The deployment files against their schemas, the `genius` CLI and each other.

deploy/Dockerfile(.cpu), .dockerignore, deploy/ray/cluster.yaml, deploy/k8s/* and
docs/operations.md are checked offline: every file parses; Kubernetes objects validate against
kubernetes-validate's strict schemas, KubeRay objects against the fields of KubeRay's CRDs
(tests/deploy/kuberay_v1.schema.json), the Ray launcher config against the schema Ray ships;
every command line (container args, shell wrappers run with a stand-in `genius`, RayJob
entrypoints, `ray job submit -- genius ...` and `docker run IMAGE ...` in comments and docs) parses
with genius's own argument parser; ports, images, paths, names and the shard map agree across
files; the shard sync script copies what a shard server reads; the sizing figures of the
operations guide are those the recorded benchmarks give.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RAY_LAUNCHER = DEPLOY / "ray" / "cluster.yaml"
DOCKERFILES = {"gpu": DEPLOY / "Dockerfile", "cpu": DEPLOY / "Dockerfile.cpu"}
OPERATIONS = ROOT / "docs" / "operations.md"
KUBERAY_SCHEMA = HERE / "kuberay_v1.schema.json"
NAMESPACE = "genius"
IMAGE_REPOSITORY = "registry.example.com/genius"
OLDEST_KUBERNETES = "1.29"  # grpc probes are GA since 1.27; the oldest minor release the manifests target
PATH_OPTIONS = ("--index", "--shards", "--token-file", "--shard-token-file", "--tls-cert", "--tls-key",
                "--shard-tls-ca", "--out", "--work", "--queries", "--encoder", "--pairs", "--store", "--dest")


# ------------------------------------------------------------------------------------- loading
@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def version() -> str:
    return pyproject()["project"]["version"]


def pinned(package: str) -> str:
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml pins no {package}==")


@cache
def yaml_docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None)


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in yaml_docs(p)]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in objects() if d["kind"] == kind]


def one(kind: str, name: str) -> dict:
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@cache
def kustomization() -> dict:
    return yaml_docs(K8S / "kustomization.yaml")[0]


def generated_configmaps() -> dict[str, list[str]]:
    """{ConfigMap name: keys} of kustomization.yaml's configMapGenerator."""
    def key(entry: str) -> str:  # "key=path" or "path" (key: the file's name)
        return entry.split("=", 1)[0] if "=" in entry else PurePosixPath(entry).name

    return {g["name"]: [key(f) for f in g.get("files", [])] for g in kustomization().get("configMapGenerator", [])}


def configmap_keys(name: str) -> list[str]:
    generated = generated_configmaps()
    if name in generated:
        return generated[name]
    return list(one("ConfigMap", name).get("data", {}))


def secret_keys(name: str) -> list[str]:
    s = one("Secret", name)
    return [*s.get("data", {}), *s.get("stringData", {})]


@dataclass
class Template:
    """A pod template and what owns it."""

    owner: dict
    template: dict
    where: str

    @property
    def spec(self) -> dict:
        return self.template["spec"]

    def containers(self, init: bool = True) -> list[dict]:
        return [*(self.spec.get("initContainers", []) if init else []), *self.spec["containers"]]


def pod_templates() -> list[Template]:
    out = []
    for _, d in objects():
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append(Template(d, d["spec"]["template"], f"{kind} {name}"))
        cluster = d["spec"] if kind == "RayCluster" else d["spec"].get("rayClusterSpec") if kind == "RayJob" else None
        if cluster:
            out.append(Template(d, cluster["headGroupSpec"]["template"], f"{kind} {name} head"))
            out += [Template(d, g["template"], f"{kind} {name} worker group {g['groupName']}")
                    for g in cluster.get("workerGroupSpecs", [])]
        if kind == "RayJob" and d["spec"].get("submitterPodTemplate"):
            out.append(Template(d, d["spec"]["submitterPodTemplate"], f"RayJob {name} submitter"))
    return out


def is_ray(t: Template) -> bool:
    return t.owner["apiVersion"].startswith("ray.io/")


# ------------------------------------------------------------------------------------- Dockerfiles
def parse_dockerfile(text: str) -> list[dict]:
    """Instructions of a Dockerfile: [{"instruction": "RUN", "value": ..., "content": ...}], with
    backslash continuations joined and comment lines (also inside a continued instruction) dropped,
    as BuildKit reads them. Cross-checked against dockerfile-parse where it is installed."""
    out, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if current is None:
            word, _, rest = stripped.partition(" ")
            current = {"instruction": word.upper(), "parts": [], "content": ""}
            stripped = rest
        current["content"] += line + "\n"
        continued = stripped.endswith("\\")
        current["parts"].append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            current["value"] = " ".join(p for p in current.pop("parts") if p)
            out.append(current)
            current = None
    assert current is None, "the last instruction ends with a continuation"
    return out


@cache
def dockerfile(flavour: str) -> list[dict]:
    return parse_dockerfile(DOCKERFILES[flavour].read_text(encoding="utf-8"))


def stages(flavour: str) -> list[list[dict]]:
    """Instructions per build stage (global ARGs before the first FROM are left out)."""
    out: list[list[dict]] = []
    for ins in dockerfile(flavour):
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def stage(flavour: str, name: str) -> list[dict]:
    found = [s for s in stages(flavour) if s[0]["value"].split()[-1] == name and " AS " in s[0]["value"].upper()]
    assert len(found) == 1, f"{DOCKERFILES[flavour].name}: no stage {name!r}"
    return found[0]


def global_args(flavour: str) -> dict[str, str]:
    args = {}
    for ins in dockerfile(flavour):
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            k, v = ins["value"].split("=", 1)
            args[k.strip()] = v.strip()
    return args


def resolve(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def json_form(ins: dict) -> list[str]:
    value = json.loads(ins["value"])
    assert isinstance(value, list), f"{ins['instruction']} must use the JSON (exec) form: {ins['content']}"
    return value


def entrypoint_and_cmd(flavour: str) -> tuple[list[str], list[str]]:
    final = stages(flavour)[-1]
    entry = [json_form(i) for i in final if i["instruction"] == "ENTRYPOINT"]
    cmd = [json_form(i) for i in final if i["instruction"] == "CMD"]
    return (entry[-1] if entry else []), (cmd[-1] if cmd else [])


def flavour_of(image: str) -> str:
    return "cpu" if image.rsplit(":", 1)[-1].endswith("-cpu") else "gpu"


def exposed_ports(flavour: str) -> set[int]:
    return {int(port.split("/")[0])
            for i in stages(flavour)[-1] if i["instruction"] == "EXPOSE" for port in i["value"].split()}


# ------------------------------------------------------------------------------------- commands
@dataclass
class Command:
    """One command line found in the deployment files: argv[0] is the program."""

    argv: list[str]
    source: str
    container: dict | None = None
    template: Template | None = None
    hostname: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def container_env(c: dict) -> dict[str, str]:
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "resourceFieldRef" in e:
            env[e["name"]] = "1"
        else:
            env[e["name"]] = f"<{e['name']}>"
    return env


def k8s_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args ($$ escapes)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), arg)


FAKE = """#!{python}
import json, os, sys
with open(os.environ["ARGV_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""


def run_with_stand_ins(argv: list[str], env: dict[str, str], tmp: Path) -> list[list[str]]:
    """Run a shell wrapper with stand-ins for genius and python that record their arguments."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("genius", "python", "python3"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp / "argv.jsonl"
    log.unlink(missing_ok=True)
    proc = subprocess.run(argv, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGV_LOG": str(log), **env},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{argv} failed: {proc.stderr}"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def hostnames(t: Template) -> list[str]:
    name = t.owner["metadata"]["name"]
    if t.owner["kind"] == "StatefulSet":
        return [f"{name}-{i}" for i in range(t.owner["spec"].get("replicas", 1))]
    return [f"{name}-5d8f7c9b6d-x2k4q"]


def container_commands(tmp: Path) -> list[Command]:
    out = []
    for t in pod_templates():
        for c in t.containers():
            if is_ray(t) and "command" not in c and "args" not in c:
                continue  # KubeRay starts `ray start` in Ray containers
            env = container_env(c)
            command = [k8s_expand(a, env) for a in c.get("command", [])]
            args = [k8s_expand(a, env) for a in c.get("args", [])]
            where = f"{t.where} container {c['name']}"
            if not command:  # the image's ENTRYPOINT (exec form) + args
                entry, cmd = entrypoint_and_cmd(flavour_of(c["image"]))
                out.append(Command(entry + (args or cmd), where, c, t, hostnames(t)[0], env))
                continue
            if Path(command[0]).name in ("sh", "bash"):
                for host in hostnames(t):
                    ran = run_with_stand_ins(command + args, {**env, "HOSTNAME": host}, tmp)
                    assert ran, f"{where}: the shell wrapper runs neither genius nor python"
                    out += [Command(argv, f"{where} ({host})", c, t, host, env) for argv in ran]
                continue
            out.append(Command(command + args, where, c, t, hostnames(t)[0], env))
    return out


def shell_lines(text: str) -> list[str]:
    """Logical lines (backslash continuations joined) of shell code."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines() if line.strip()]


def commands_in_text(text: str, source: str) -> list[Command]:
    """`genius ...` (also after `ray job submit ... --` or `kubectl exec ... --`) and
    `docker run ... IMAGE args` in shell lines."""
    out = []
    for line in shell_lines(text):
        line = line.lstrip("#").strip()
        if "genius" not in line:
            continue
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:
            continue
        segments, current = [], []
        for tok in tokens:
            if tok and set(tok) <= set(";&|<>"):
                segments.append(current)
                current = []
            else:
                current.append(tok)
        segments.append(current)
        for seg in segments:
            if not seg:
                continue
            if seg[0] == "genius":
                out.append(Command(seg, source))
            elif seg[:2] == ["docker", "run"]:
                images = [i for i, tok in enumerate(seg) if tok.startswith(IMAGE_REPOSITORY + ":")]
                if images:
                    entry, cmd = entrypoint_and_cmd(flavour_of(seg[images[0]]))
                    out.append(Command(entry + (seg[images[0] + 1:] or cmd), source))
            elif "--" in seg and seg[seg.index("--") + 1:seg.index("--") + 2] == ["genius"]:
                out.append(Command(seg[seg.index("--") + 1:], source))
    return out


def markdown_code(path: Path) -> str:
    """The shell code blocks of a Markdown file (fences with no language, bash, sh, shell or console)."""
    lines, language = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            language = fence.group(1) if language is None else None
        elif language in ("", "bash", "sh", "shell", "console"):
            lines.append(line)
    return "\n".join(lines)


def comments(path: Path) -> str:
    """Code quoted in comments: comment lines indented by two spaces or more after the '#'."""
    return "\n".join(m.group(1) for m in re.finditer(r"^\s*#\s{2,}(\S.*)$", path.read_text(encoding="utf-8"), re.M))


def text_commands() -> list[Command]:
    out = []
    for job in of_kind("RayJob"):
        out.append(Command(shlex.split(job["spec"]["entrypoint"]), f"RayJob {job['metadata']['name']} entrypoint"))
    for path in [RAY_LAUNCHER, *DOCKERFILES.values(), *K8S.glob("*.yaml")]:
        out += commands_in_text(comments(path), str(path.relative_to(ROOT)))
    if OPERATIONS.exists():
        out += commands_in_text(markdown_code(OPERATIONS), str(OPERATIONS.relative_to(ROOT)))
    for flavour in DOCKERFILES:
        entry, cmd = entrypoint_and_cmd(flavour)
        out.append(Command(entry + cmd, f"{DOCKERFILES[flavour].name} ENTRYPOINT + CMD"))
    return out


@cache
def genius_parser():
    from cluster.cli import build_parser

    return build_parser()


@cache
def shard_sync_module():
    spec = importlib.util.spec_from_file_location("shard_sync", K8S / "shard_sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(command: Command):
    """The argparse namespace of a genius or shard_sync.py command line (None for --help)."""
    argv = command.argv
    if argv[0] == "genius":
        parser, args = genius_parser(), argv[1:]
    elif argv[0] in ("python", "python3") and argv[1].endswith("shard_sync.py"):
        assert PurePosixPath(argv[1]).name == "shard_sync.py"
        parser, args = shard_sync_module().build_parser(), argv[2:]
    else:
        raise AssertionError(f"{command.source}: runs {argv[0]!r}, neither genius nor shard_sync.py")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(args)
    except SystemExit as exc:
        if exc.code == 0 and "--help" in args:
            return None
        raise AssertionError(f"{command.source}: `{shlex.join(argv)}` does not parse: {err.getvalue()}") from None


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> list[Command]:
    return container_commands(tmp_path_factory.mktemp("stand-ins")) + text_commands()


def parsed(commands, *path) -> list[tuple[Command, object]]:
    """Parsed container commands of genius with these subcommand words, e.g. ("serve", "replica")."""
    out = []
    for c in commands:
        if c.container is not None and c.argv[0] == "genius" and c.argv[1:1 + len(path)] == list(path):
            out.append((c, parse(c)))
    return out


# ================================================================================ every file parses
def test_every_deployment_file_parses():
    yaml_files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.name for p in yaml_files} >= {"cluster.yaml", "kustomization.yaml", "search-replica.yaml",
                                           "shard-server.yaml", "raycluster.yaml", "rayjob-build.yaml"}
    for path in yaml_files:
        docs = yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    for path, d in objects():
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), path
    assert isinstance(json.loads((K8S / "shards.json").read_text()), dict)
    compile((K8S / "shard_sync.py").read_text(), "shard_sync.py", "exec")
    for flavour in DOCKERFILES:
        assert [i["instruction"] for i in dockerfile(flavour)].count("FROM") >= 2
    assert (ROOT / ".dockerignore").read_text().strip()


def test_kustomization_lists_files_that_exist():
    k = kustomization()
    for rel in k["resources"]:
        assert (K8S / rel).is_file(), rel
    for gen in k.get("configMapGenerator", []):
        for f in gen["files"]:
            assert (K8S / f.split("=", 1)[-1]).is_file(), f
    applied = {p.name for p in manifest_files()} - set(k["resources"])
    # What `kubectl apply -k` leaves out is applied on purpose (and says so in the file).
    assert applied == {"secrets.example.yaml", "raycluster.yaml", "rayjob-build.yaml", "rayjob-search-batch.yaml"}
    assert k["namespace"] == NAMESPACE
    assert [i["name"] for i in k.get("images", [])] == [IMAGE_REPOSITORY]


# ================================================================================ schemas
def kubernetes_validate():
    reason = "kubernetes-validate is not installed: pip install kubernetes-validate (test extra)"
    return pytest.importorskip("kubernetes_validate", reason=reason)


def test_kubernetes_objects_validate_against_the_strict_schemas():
    kv = kubernetes_validate()
    core = [(p, d) for p, d in objects() if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in core} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                            "StatefulSet", "Secret", "PersistentVolumeClaim", "Namespace"}
    for k8s_version in (OLDEST_KUBERNETES, kv.utils.latest_version()):
        for path, d in core:
            try:
                kv.validate(d, k8s_version, strict=True)
            except kv.ValidationError as err:
                where = ".".join(str(p) for p in err.path)
                pytest.fail(f"{path.name}: {d['kind']} {d['metadata']['name']} (Kubernetes {k8s_version}): "
                            f"{where}: {err.message}")


@cache
def kuberay_validator():
    kv = kubernetes_validate()
    import jsonschema
    import referencing
    from importlib.resources import files

    latest = kv.utils.latest_version()
    folder = files("kubernetes_validate") / "kubernetes-json-schema"
    strict = [p for p in folder.iterdir() if p.name.startswith(f"v{latest}") and p.name.endswith("-strict")][0]
    definitions = json.loads((strict / "_definitions.json").read_text())
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    registry = referencing.Registry().with_resources([
        (definitions["$id"], referencing.Resource.from_contents(definitions)),
        (schema["$id"], referencing.Resource.from_contents(schema))])
    return lambda kind: jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"},
                                                        registry=registry)


def test_kuberay_objects_have_only_the_fields_their_crds_define():
    ray_objects = [(p, d) for p, d in objects() if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in ray_objects} == {"RayCluster", "RayJob"}
    for path, d in ray_objects:
        assert d["apiVersion"] == "ray.io/v1", path
        errors = sorted(kuberay_validator()(d["kind"]).iter_errors(d), key=lambda e: list(e.path))
        assert not errors, f"{path.name}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message[:300]}" for e in errors[:5])


def test_the_vendored_kuberay_schema_rejects_a_misspelt_field():
    job = json.loads(json.dumps(one("RayJob", "genius-index-build")))
    job["spec"]["rayClusterSpec"]["workerGroupSpec"] = job["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
    assert list(kuberay_validator()("RayJob").iter_errors(job))
    job = json.loads(json.dumps(one("RayCluster", "genius-ray")))
    job["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # PodSpec
    assert list(kuberay_validator()("RayCluster").iter_errors(job))


def test_kuberay_objects_follow_the_operators_rules():
    from packaging.specifiers import SpecifierSet

    ray_pin = global_args("gpu")["RAY_VERSION"]
    assert global_args("cpu")["RAY_VERSION"] == ray_pin, "both images must carry the same Ray"
    ray_range = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("ray["))
    assert ray_pin in SpecifierSet(ray_range.split("]", 1)[1]), f"Ray {ray_pin} is outside pyproject's {ray_range}"
    clusters = {c["metadata"]["name"]: c["spec"] for c in of_kind("RayCluster")}
    for job in of_kind("RayJob"):
        spec = job["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "a RayJob gives a cluster or selects one"
        if "clusterSelector" in spec:
            assert not spec.get("shutdownAfterJobFinishes"), "KubeRay refuses shutdown of a selected cluster"
            assert spec["clusterSelector"]["ray.io/cluster"] in clusters
        else:
            clusters[f"{job['metadata']['name']} (RayJob)"] = spec["rayClusterSpec"]
    for name, spec in clusters.items():
        assert spec["rayVersion"] == ray_pin, f"{name}: rayVersion {spec['rayVersion']} != the images' Ray {ray_pin}"
        groups = spec.get("workerGroupSpecs", [])
        assert len({g["groupName"] for g in groups}) == len(groups)
        for g in groups:
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (name, g["groupName"])
        assert any("nvidia.com/gpu" in c["resources"].get("limits", {})
                   for g in groups for c in g["template"]["spec"]["containers"]), f"{name}: no GPU worker group"


def test_ray_cluster_launcher_config_validates_against_rays_schema():
    import jsonschema

    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is a dependency of genius"
    schema = json.loads((Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json").read_text())
    config = yaml_docs(RAY_LAUNCHER)[0]
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "the head runs the driver only"
    gpu = [t for t in types.values() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu and all(t.get("max_workers", 0) > 0 for t in gpu), "GPU worker nodes for the embedding actors"
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]) >= \
        config["max_workers"]
    docker = config["docker"]
    assert docker["image"] == f"{IMAGE_REPOSITORY}:{version()}" and flavour_of(docker["image"]) == "gpu"
    # The launcher starts the container with `bash`: the image's `genius` entry point must be reset.
    assert '--entrypoint=""' in docker["run_options"]
    assert entrypoint_and_cmd("gpu")[0] == ["genius"]


# ================================================================================ Dockerfiles
def test_dockerfiles_read_the_same_with_dockerfile_parse():
    dockerfile_parse = pytest.importorskip(
        "dockerfile_parse", reason="dockerfile-parse is not installed: pip install dockerfile-parse (test extra)")
    for flavour, path in DOCKERFILES.items():
        theirs = [i for i in dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes())).structure
                  if i["instruction"] != "COMMENT"]
        assert [(i["instruction"], " ".join(i["value"].split())) for i in theirs] == \
            [(i["instruction"], " ".join(i["value"].split())) for i in dockerfile(flavour)], path


def test_images_run_genius_as_a_non_root_user_on_the_right_base():
    requires = pyproject()["project"]["requires-python"]
    for flavour in DOCKERFILES:
        args = global_args(flavour)
        final = stages(flavour)[-1]
        base = resolve(final[0]["value"].split()[0], args)
        if flavour == "gpu":
            assert base.startswith("nvidia/cuda:") and "ubuntu" in base, f"{flavour}: CUDA-capable base, not {base}"
            python = args["PYTHON_VERSION"]
        else:
            assert base.startswith("python:"), base
            python = base.split(":")[1].split("-")[0]
        from packaging.specifiers import SpecifierSet

        assert f"{python}.0" in SpecifierSet(requires), f"{flavour}: Python {python} vs requires-python {requires}"
        users = [i["value"].split(":")[0] for i in final if i["instruction"] == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{flavour}: runs as {users}"
        assert entrypoint_and_cmd(flavour) == (["genius"], ["--help"])


def test_images_pin_the_torch_pair_of_pyproject():
    for flavour in DOCKERFILES:
        args = global_args(flavour)
        assert args["TORCH_VERSION"] == pinned("torch")
        assert args["TORCHVISION_VERSION"] == pinned("torchvision")
        runs = [resolve(i["value"], args) for i in stage(flavour, "build") if i["instruction"] == "RUN"]
        torch = [r for r in runs if f"torch=={pinned('torch')}" in r]
        assert torch and f"torchvision=={pinned('torchvision')}" in torch[0]


def test_image_layers_cache_dependencies_before_the_source():
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for flavour in DOCKERFILES:
        build = stage(flavour, "build")
        steps = [(i["instruction"], i["value"]) for i in build]

        def first(predicate, what):
            found = [n for n, (ins, value) in enumerate(steps) if predicate(ins, value)]
            assert found, f"{flavour}: no {what}"
            return found[0]

        torch = first(lambda ins, v: ins == "RUN" and "torch==" in v, "torch install")
        manifest = first(lambda ins, v: ins == "COPY" and "pyproject.toml" in v, "COPY pyproject.toml")
        deps = first(lambda ins, v: ins == "RUN" and "-r /tmp/requirements.txt" in v, "dependency install")
        source = first(lambda ins, v: ins == "COPY" and v.split()[0].rstrip("/") in ("genius", "workers", "cluster",
                                                                                    "proto", "."), "source COPY")
        project = first(lambda ins, v: ins == "RUN" and "--no-deps /src" in v, "project install")
        assert torch < manifest < deps < source < project, f"{flavour}: layer order {steps}"
        copied = {v.split()[0].rstrip("/") for ins, v in steps[source:project] if ins == "COPY"}
        assert copied >= {p.rstrip("*") for p in packages}, f"{flavour}: the image misses packages"
        for ins, value in steps:
            if ins == "RUN" and "pip install" in value:
                assert not re.search(r"\s(-e|--editable)\s", value), f"{flavour}: editable install in the image"


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((line.startswith("!"), line.lstrip("!").strip("/")))
    return out


def ignored(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything below it."""
    result = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for negated, pattern in dockerignore_patterns():
        regex = re.compile("^" + re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
                           .replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")
        if any(regex.match(p) for p in prefixes):
            result = not negated
    return result


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_rest():
    for flavour in DOCKERFILES:
        for ins in stage(flavour, "build"):
            if ins["instruction"] == "COPY" and "--from" not in ins["value"]:
                src = ins["value"].split()[0]
                assert (ROOT / src).exists(), f"{flavour}: COPY {src}: no such file"
                assert not ignored(src), f"{flavour}: COPY {src} but .dockerignore drops it"
                for path in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else []:
                    if "__pycache__" not in path.parts:
                        assert not ignored(path.relative_to(ROOT).as_posix()), path
    for heavy in (".git", ".venv", "tests", "bench", "deploy", "demo_out", "genius/__pycache__/x.pyc",
                  "my-index/.build/job.json", "shards/data-000000.tar"):
        assert ignored(heavy), heavy


def test_packages_data_files_reach_the_image():
    """The images install genius as a wheel: files other than Python modules must be package data."""
    data = pyproject().get("tool", {}).get("setuptools", {}).get("package-data", {})
    missing = []
    for package in ("genius", "workers", "cluster", "proto"):
        for path in sorted((ROOT / package).rglob("*")):
            if not path.is_file() or path.suffix in (".py", ".pyc", ".pyi", ".proto") or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / package).as_posix()
            globs = data.get(package, []) + data.get("*", [])
            sub = [(".".join((package, *Path(rel).parent.parts[:i])), "/".join(Path(rel).parts[i:]))
                   for i in range(len(Path(rel).parent.parts) + 1)]
            if not any(fnmatch.fnmatch(r, g) for name, r in sub for g in data.get(name, []) + data.get("*", [])) and \
                    not any(fnmatch.fnmatch(rel, g) for g in globs):
                missing.append(f"{package}/{rel}")
    assert not missing, ("not in the wheel the images install (pip install /src), add them to pyproject.toml "
                         f"[tool.setuptools.package-data]: {missing}")


# ================================================================================ commands
def test_every_command_in_the_deployment_files_parses_with_the_cli(commands):
    sources = {c.source.split(" (")[0] for c in commands}
    assert any(c.argv[:3] == ["genius", "serve", "replica"] for c in commands)
    assert any(c.argv[:3] == ["genius", "serve", "shard"] for c in commands)
    assert any(c.argv[:3] == ["genius", "index", "build"] and c.source.startswith("RayJob") for c in commands)
    assert any(c.argv[:2] == ["genius", "search-batch"] for c in commands)
    assert any("cluster.yaml" in s for s in sources), "the launcher config shows ray job submit -- genius ..."
    for command in commands:
        args = parse(command)
        if command.argv[0] == "genius" and args is not None:
            assert callable(getattr(args, "run", None)), command.source


def test_ray_jobs_join_their_cluster_and_resume(commands):
    for c in commands:
        if c.argv[:3] == ["genius", "index", "build"] or c.argv[:2] == ["genius", "search-batch"]:
            if "RayJob" in c.source or "cluster.yaml" in c.source:
                args = parse(c)
                assert args.address == "auto", f"{c.source}: --address auto (the cluster the job runs on)"
                assert args.resume, f"{c.source}: --resume, so that a retried job continues"
    build = parse(Command(shlex.split(one("RayJob", "genius-index-build")["spec"]["entrypoint"]), "RayJob"))
    mounts = {m["mountPath"] for t in pod_templates() if t.owner["metadata"]["name"] == "genius-index-build"
              for c in t.containers() for m in c.get("volumeMounts", [])}
    for path in (build.out, build.work, build.shards, build.encoder):
        assert any(path.startswith(m + "/") for m in mounts if m != "/dev/shm"), f"{path} is on no shared volume"
    groups = one("RayJob", "genius-index-build")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in groups for c in g["template"]["spec"]["containers"])
    assert build.actors * build.num_gpus_per_actor <= gpus, "the embedding actors need more GPUs than the cluster has"
    assert build.train_workers <= gpus


def test_shard_servers_serve_the_vector_shard_of_their_pod_ordinal(commands):
    sts = one("StatefulSet", "genius-shard")
    servers = parsed(commands, "serve", "shard")
    assert [c.hostname for c, _ in servers] == [f"genius-shard-{i}" for i in range(sts["spec"]["replicas"])]
    (_, replica), *_ = parsed(commands, "serve", "replica")
    for c, args in servers:
        ordinal = int(c.hostname.rsplit("-", 1)[1])
        assert args.range == ordinal
        syncs = [parse(s) for s in commands if s.hostname == c.hostname and s.argv[0] == "python"]
        assert len(syncs) == 2, "an init container and a sidecar copy the shard"
        for sync in syncs:
            assert sync.shard == ordinal and sync.dest == args.index and sync.store == replica.index
        assert sum(s.once for s in syncs) == 1


def mounts_of(c: dict, t: Template) -> dict[str, dict]:
    volumes = {v["name"]: v for v in t.spec.get("volumes", [])}
    for claim in t.owner["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"], "claimTemplate": claim}
    return {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}


def test_paths_in_container_commands_lie_on_mounted_volumes_with_those_keys(commands):
    checked = 0
    for c in commands:
        if c.container is None:
            continue
        args = vars(parse(c) or {})
        mounts = mounts_of(c.container, c.template)
        for option in PATH_OPTIONS:
            value = args.get(option.lstrip("-").replace("-", "_"))
            if not isinstance(value, str) or option == "--shards" and c.argv[:2] != ["genius", "serve"]:
                continue
            under = [m for m in mounts if value.startswith(m.rstrip("/") + "/")]
            assert under, f"{c.source}: {option} {value} is on no volume of the container"
            volume, rel = mounts[under[0]], value[len(under[0]):].strip("/")
            if "configMap" in volume:
                assert rel in configmap_keys(volume["configMap"]["name"]), f"{c.source}: {option} {value}"
            if "secret" in volume:
                assert rel in secret_keys(volume["secret"]["secretName"]), f"{c.source}: {option} {value}"
            checked += 1
    assert checked >= 8


def test_ports_agree_across_commands_containers_probes_services_and_images(commands):
    for c, args in parsed(commands, "serve"):
        ports = {p["name"]: p["containerPort"] for p in c.container["ports"]}
        listen = int(args.listen.rsplit(":", 1)[1])
        assert ports["grpc"] == listen, c.source
        assert ports["metrics"] == args.metrics_port, c.source
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c.container[probe]["grpc"]["port"] == listen, f"{c.source}: {probe} on the gRPC port"
            assert c.container[probe]["grpc"].get("service", "") == "", "the overall health status"
        annotations = c.template.template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == args.metrics_port
        assert args.tls_cert is None, "kubelet grpc probes speak plaintext: a TLS port needs exec probes"
        assert set(ports.values()) <= exposed_ports(flavour_of(c.container["image"]))
    for t in pod_templates():
        for c in t.containers():
            assert {p["containerPort"] for p in c.get("ports", [])} <= exposed_ports(flavour_of(c["image"])), t.where


def workloads() -> list[dict]:
    return [d for _, d in objects() if d["kind"] in ("Deployment", "StatefulSet")]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_autoscaler_and_disruption_budgets_select_their_pods():
    for svc in of_kind("Service"):
        spec = svc["spec"]
        assert spec.get("clusterIP") == "None", f"{svc['metadata']['name']}: headless (clients balance per pod)"
        selected = [w for w in workloads() if matches(spec["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, svc["metadata"]["name"]
        container_ports = {p["name"]: p["containerPort"] for c in selected[0]["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in spec["ports"]:
            assert port["targetPort"] in container_ports and container_ports[port["targetPort"]] == port["port"]
    for pdb in of_kind("PodDisruptionBudget"):
        selected = [w for w in workloads()
                    if matches(pdb["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, pdb["metadata"]["name"]
    for w in workloads():
        assert matches(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
    sts = one("StatefulSet", "genius-shard")
    assert sts["spec"]["serviceName"] == "genius-shard" and one("Service", "genius-shard")
    hpa = one("HorizontalPodAutoscaler", "genius-replica")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "genius-replica") and one("Deployment", target["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "one replica may be disrupted (PDB) while one serves"
    assert "replicas" not in one("Deployment", target["name"])["spec"], "the HPA owns the replica count"
    assert one("PodDisruptionBudget", "genius-replica")["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_termination_grace_outlasts_drain_plus_grace(commands):
    for c, args in parsed(commands, "serve"):
        period = c.template.spec["terminationGracePeriodSeconds"]
        assert period > args.drain_seconds + args.grace_seconds, c.source


def test_the_shard_map_names_one_pod_per_vector_shard():
    shard_map = json.loads((K8S / "shards.json").read_text())
    sts, svc = one("StatefulSet", "genius-shard"), one("Service", "genius-shard")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert sorted(map(int, shard_map)) == list(range(sts["spec"]["replicas"]))
    for number, addresses in shard_map.items():
        addresses = [addresses] if isinstance(addresses, str) else addresses
        assert addresses[0] == f"genius-shard-{number}.genius-shard.{NAMESPACE}.svc.cluster.local:{port}"
    assert svc["spec"].get("publishNotReadyAddresses") is True
    claims = sts["spec"]["volumeClaimTemplates"]
    assert len(claims) == 1, "one volume per shard server pod, i.e. per vector shard"
    server = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "shard")
    assert claims[0]["metadata"]["name"] in {m["name"] for m in server["volumeMounts"]}


def test_every_image_is_the_projects_at_its_version():
    images = {c["image"] for t in pod_templates() for c in t.containers()}
    images.add(yaml_docs(RAY_LAUNCHER)[0]["docker"]["image"])
    for text in [comments(p) for p in [RAY_LAUNCHER, *DOCKERFILES.values(), *K8S.glob("*.yaml")]] + [
            OPERATIONS.read_text() if OPERATIONS.exists() else ""]:
        images |= set(re.findall(rf"{re.escape(IMAGE_REPOSITORY)}:[\w.-]+", text))
    assert images == {f"{IMAGE_REPOSITORY}:{version()}", f"{IMAGE_REPOSITORY}:{version()}-cpu"}, images
    for t in pod_templates():
        for c in t.containers():
            if is_ray(t):
                assert flavour_of(c["image"]) == "gpu", f"{t.where}: one Ray image on every node"
            assert c.get("imagePullPolicy") == "IfNotPresent"
    for flavour, path in DOCKERFILES.items():
        tags = re.findall(rf"-t ({re.escape(IMAGE_REPOSITORY)}:\S+)", path.read_text())
        assert tags and all(flavour_of(tag) == flavour for tag in tags), path


def test_containers_are_non_root_and_sized():
    for t in pod_templates():
        if not is_ray(t):
            assert t.spec["securityContext"]["runAsNonRoot"] is True, t.where
        assert t.spec["securityContext"]["runAsUser"] == 10001, t.where
        for c in t.containers():
            res = c.get("resources", {})
            requests = res.get("requests", {})
            assert requests.get("cpu") and requests.get("memory"), f"{t.where} {c['name']}"
            assert res.get("limits", {}).get("memory"), f"{t.where} {c['name']}"
            if not is_ray(t):
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_ray_pods_share_the_index_store_and_shared_memory():
    for t in pod_templates():
        if not is_ray(t):
            continue
        for c in t.spec["containers"]:
            mounts = mounts_of(c, t)
            assert mounts["/data"]["persistentVolumeClaim"]["claimName"] == "genius-index", t.where
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", t.where


def test_clients_balance_round_robin_over_the_headless_replica_service():
    svc = one("Service", "genius-replica")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    target = f"dns:///{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    assert target in (K8S / "search-replica.yaml").read_text()
    assert target in OPERATIONS.read_text()
    pytest.importorskip("grpc", reason="grpcio is a dependency of genius")
    from genius.client import SearchClient

    client = SearchClient(target)  # channels connect lazily: nothing is resolved or dialled here
    try:
        assert ("grpc.lb_policy_name", "round_robin") in client._args
    finally:
        client.close()


# ================================================================================ shard sync
def publish(store: Path, name: str, shards: list[tuple[int, int]], tables: list[tuple[int, int]],
            damage: str | None = None) -> None:
    """A stand-in index version: manifest (format v2 fields the sync reads) and its files."""
    folder = store / name
    files = {}
    for kind, ranges, suffix in (("vectors", shards, "npy"), ("items", tables, "arrow")):
        for a, b in ranges:
            rel = f"{kind}/{a:012d}-{b:012d}.{suffix}"
            data = f"{name} {rel}".encode() * (b - a)
            (folder / kind).mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
            files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for rel in ("trie/text-00000.ids", "model/decoder.pt"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"x")
        files[rel] = {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    if damage:
        data = (folder / damage).read_bytes()
        (folder / damage).write_bytes(bytes([data[0] ^ 1]) + data[1:])
    manifest = {"format_version": 2, "version": int(name[2:]), "files": files,
                "vector_shards": [{"start": a, "end": b, "file": f"vectors/{a:012d}-{b:012d}.npy"} for a, b in shards],
                "item_tables": [{"start": a, "end": b, "file": f"items/{a:012d}-{b:012d}.arrow"} for a, b in tables]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (store / "CURRENT").write_text(name)


def test_shard_sync_copies_the_files_of_its_shard_and_follows_current(tmp_path):
    sync = shard_sync_module()
    store, dest = tmp_path / "store", tmp_path / "shard"
    assert sync.sync_once(store, dest, 1) is None  # nothing published yet: --once keeps waiting
    publish(store, "v-0", [(0, 25), (25, 50), (50, 60)], [(0, 30), (30, 60)])
    assert sync.sync_once(store, dest, 1) == "v-0"
    got = sorted(p.relative_to(dest / "v-0").as_posix() for p in (dest / "v-0").rglob("*") if p.is_file())
    # what workers.shard_server.ShardVersion.open reads: manifest, its vectors, overlapping item tables
    assert got == ["items/000000000000-000000000030.arrow", "items/000000000030-000000000060.arrow",
                   "manifest.json", "vectors/000000000025-000000000050.npy"]
    assert (dest / "CURRENT").read_text() == "v-0"

    publish(store, "v-1", [(0, 25), (25, 50), (50, 60)], [(0, 60)], damage="vectors/000000000025-000000000050.npy")
    assert sync.sync_once(store, dest, 1) == "v-0", "a damaged file in the store: keep serving the last good version"
    assert not (dest / "v-1").exists() and not list(dest.glob(".staging-*"))

    for n in (2, 3, 4):
        publish(store, f"v-{n}", [(0, 30), (30, 60)], [(0, 60)])
    assert sync.sync_once(store, dest, 1, keep=2) == "v-4"
    assert sorted(p.name for p in dest.iterdir()) == ["CURRENT", "v-3", "v-4"]
    assert sync.sync_once(store, dest, 2) == "v-4", "a version without this shard leaves CURRENT where it is"

    main = subprocess.run([sys.executable, str(K8S / "shard_sync.py"), "--store", str(store), "--dest",
                           str(tmp_path / "other"), "--shard", "0", "--once", "--timeout", "5"],
                          capture_output=True, text=True, timeout=60)
    assert main.returncode == 0, main.stderr
    assert (tmp_path / "other" / "CURRENT").read_text() == "v-4"


# ================================================================================ operations guide
RUNBOOKS = ("node loss mid-build", "driver crash", "shard server down", "bad inputs", "damaged index file")


def headings() -> list[str]:
    return [h.strip().lower() for h in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.M)]


def test_operations_guide_covers_sizing_upgrades_backups_and_a_runbook_per_failure():
    found = headings()
    for topic in ("sizing", "upgrades", "backups", "runbook"):
        assert any(topic in h for h in found), f"docs/operations.md has no section on {topic}"
    for failure in RUNBOOKS:
        assert any(failure in h for h in found), f"docs/operations.md has no runbook for {failure}"
    # Each runbook names the tests that exercise the failure: they must exist.
    cited = re.findall(r"tests/([\w/]+\.py)::(test_\w+)", OPERATIONS.read_text())
    assert len(cited) >= len(RUNBOOKS)
    for rel, name in cited:
        text = (ROOT / "tests" / rel).read_text()
        assert re.search(rf"^def {name}\(", text, re.M), f"docs/operations.md cites a missing test {rel}::{name}"


def benchmark_figures() -> dict[str, str]:
    """The sizing guide's measured inputs, formatted as the guide prints them."""
    results = ROOT / "bench" / "results"
    store = json.loads((results / "store.json").read_text())
    largest = max(store["runs"], key=lambda r: r["n"])
    build = json.loads((results / "build.json").read_text())
    one_actor = next(r for r in build["runs"] if r["actors"] == 1)
    decode = json.loads((results / "decode.json").read_text())
    figures = {
        "trie bytes per item": f"{largest['bytes_per_item']:.2f}",
        "trie at 10^9": f"{largest['bytes_per_item'] * 1e9 / 1e9:.1f} GB",
        "open RSS": f"{largest['open_rss_bytes'] / 2**20:,.0f} MiB",
        "embed items/s per CPU actor": f"{one_actor['steady_items_per_s']:.0f}",
        "CPU core-hours to embed 10^9": f"{1e9 / one_actor['steady_items_per_s'] / 3600:,.0f}",
        "decode ms of one core per query (paper size, beam 50)":
            f"{decode['timing']['ours_best']['cpu_ms_per_query']:.0f}",
    }
    return figures


def test_sizing_figures_are_those_of_the_recorded_benchmarks():
    text = OPERATIONS.read_text()
    for what, figure in benchmark_figures().items():
        assert figure in text, f"docs/operations.md: {what} should read {figure} (bench/results)"
