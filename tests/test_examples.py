"""The examples cannot rot: every YAML document matches the Kubernetes API models, the RBAC is
the minimum, the pod specs keep the promised hardening, and every portproxy command line in
them (YAML args, docker-run.sh, config.toml) passes the CLI's own validation.

CLI validation runs twice per command line: the ``run`` command's click parameters parse and
convert every argument (a ``click.Command`` sharing ``run``'s parameters, with a callback that
only records), then ``check --offline`` parses and bind-tests the forwards. As root the check
runs in a private network namespace, so ports 53 and 80 are free whatever this machine runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
YAML_FILES = ("daemonset-hostnetwork.yaml", "pod-hostport.yaml", "configmap-mode.yaml")


def image_uid() -> int:
    """The UID the Dockerfile runs as: the examples' runAsUser must be the same number."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", text, re.M)
    assert users, "the Dockerfile has no numeric USER"
    return int(users[-1])


IMAGE_UID = image_uid()
ADMIN_PORT = 9753
NODE_NAME = "node-a"  # stands in for the downward API's spec.nodeName

# The API calls portproxy makes (portproxy/resolve/kubernetes.py): Services are listed and
# watched with a metadata.name field selector (RBAC verbs list, watch) and read with get (by
# `portproxy check` in the pod); EndpointSlices are listed and watched by label. ConfigMaps,
# only in ConfigMap mode, are listed and watched by name (never read with get).
SERVICE_RULES = {("", "services"): {"get", "list", "watch"},
                 ("discovery.k8s.io", "endpointslices"): {"list", "watch"}}
CONFIGMAP_RULES = {("", "configmaps"): {"list", "watch"}}
CONFIGMAP_FLAGS = ("--tcp-services-configmap", "--udp-services-configmap")

# Flags of DESIGN §1 that the CLI may not have yet: an example using one is skipped, with the
# flag named, until it exists (any other unknown flag is a failure).
CONTRACT_FLAGS = {
    "--config", "--kubeconfig", "--context", "--admin-address", "--log-format", "--log-level",
    "--access-log", "--drain-timeout", "--workers", "--no-splice", "--max-conns",
    "--create-interface", "--address", "--tcp-services-configmap", "--udp-services-configmap",
    "--mode", "--balance", "--connect-timeout", "--idle-timeout", "--max-flows",
    "--proxy-protocol", "--allow", "--fin-timeout", "--node-name",
}


# ----------------------------------------------------------------------------- loading

def documents(name: str) -> list[dict[str, Any]]:
    with open(EXAMPLES / name, encoding="utf-8") as stream:
        docs = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    assert docs, f"{name} holds no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{name}: a document is not a mapping: {doc!r}"
    return docs


def test_every_example_exists() -> None:
    for name in (*YAML_FILES, "docker-run.sh", "config.toml"):
        assert (EXAMPLES / name).is_file(), f"examples/{name} is missing"


# ----------------------------------------------------------------------------- API models

def models() -> Any:
    import kubernetes.client  # heavy (thousands of models): imported only by these tests

    return kubernetes.client


def model_name(api_version: str, kind: str) -> str:
    version = api_version.rpartition("/")[2]
    return version[:1].upper() + version[1:] + kind


def snake(kind: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", kind).lower()


def api_scope(api_version: str, kind: str) -> str:
    """'namespaced' or 'cluster', from the generated API class of that group/version.

    Same mapping as kubernetes.utils.create_from_yaml: a kind/apiVersion pair the client
    cannot create does not exist.
    """
    group, _, version = api_version.rpartition("/")
    group = "".join(word.capitalize()
                    for word in "".join((group or "core").rsplit(".k8s.io", 1)).split("."))
    api = getattr(models(), f"{group}{version.capitalize()}Api", None)
    assert api is not None, f"no API group/version {api_version!r}"
    if hasattr(api, f"create_namespaced_{snake(kind)}"):
        return "namespaced"
    assert hasattr(api, f"create_{snake(kind)}"), f"{api_version} has no kind {kind!r}"
    return "cluster"


_WRAPPED = re.compile(r"^(Optional|List|list)\[(.*)\]$")
_DICT = re.compile(r"^(?:Dict\[|dict\()\s*str\s*,\s*(.*)[\])]$")


def check_fields(data: Any, type_name: str, path: str, problems: list[str]) -> None:
    """Walk ``data`` along the client's openapi_types: unknown keys and wrong scalar types
    are problems (the client's own deserializer silently drops unknown keys)."""
    match = _WRAPPED.match(type_name)
    if match and match.group(1) == "Optional":
        check_fields(data, match.group(2), path, problems)
        return
    if match:
        if not isinstance(data, list):
            problems.append(f"{path}: expected a list, got {data!r}")
            return
        for index, item in enumerate(data):
            check_fields(item, match.group(2), f"{path}[{index}]", problems)
        return
    match = _DICT.match(type_name)
    if match:
        if not isinstance(data, dict):
            problems.append(f"{path}: expected a mapping, got {data!r}")
            return
        for key, value in data.items():
            if not isinstance(key, str):
                problems.append(f"{path}: key {key!r} is not a string")
            check_fields(value, match.group(1), f"{path}.{key}", problems)
        return
    scalars: dict[str, tuple[type, ...]] = {
        "str": (str,), "bool": (bool,), "int": (int,), "float": (int, float),
        "datetime": (str,), "date": (str,), "bytearray": (str,),
    }
    if type_name == "object":
        return  # IntOrString, RawExtension, quantities: the server decides
    if type_name in scalars:
        ok = isinstance(data, scalars[type_name])
        if type_name in ("int", "float") and isinstance(data, bool):
            ok = False
        if not ok:
            problems.append(f"{path}: expected {type_name}, got {data!r}")
        return
    klass = getattr(models().models, type_name, None)
    if klass is None:
        problems.append(f"{path}: the client has no type {type_name!r}")
        return
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a {type_name} mapping, got {data!r}")
        return
    by_json = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    for key, value in data.items():
        if key not in by_json:
            problems.append(f"{path}.{key}: no such field in {type_name}")
            continue
        check_fields(value, klass.openapi_types[by_json[key]], f"{path}.{key}", problems)


def deserialize(doc: dict[str, Any], type_name: str) -> Any:
    """The client's own deserializer (required fields, strict types in newer clients)."""
    client = models().ApiClient()
    try:
        text = json.dumps(doc)
        if "response_text" in client.deserialize.__code__.co_varnames:
            return client.deserialize(text, type_name, "application/json")

        class Response:  # the older clients read ``.data`` off a urllib3-like response
            data = text

        return client.deserialize(Response(), type_name)
    finally:
        client.close()


def model_problems(doc: dict[str, Any]) -> list[str]:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"document without apiVersion/kind: {doc!r}"]
    type_name = model_name(api_version, kind)
    if getattr(models().models, type_name, None) is None:
        return [f"{api_version} {kind}: the client has no model {type_name}"]
    problems: list[str] = []
    check_fields(doc, type_name, kind, problems)
    try:
        obj = deserialize(doc, type_name)
    except Exception as exc:  # the model's own validation, whatever its exception type
        problems.append(f"{kind}: the client rejects it: {exc}")
    else:
        if obj is None:
            problems.append(f"{kind}: the client deserialized nothing")
    return problems


@pytest.mark.parametrize("name", YAML_FILES)
def test_documents_match_kubernetes_models(name: str) -> None:
    problems = [f"{name}: {p}" for doc in documents(name) for p in model_problems(doc)]
    assert problems == []


def test_model_check_rejects_unknown_and_mistyped_fields() -> None:
    good = documents("pod-hostport.yaml")[-1]
    assert good["kind"] == "Pod"
    assert model_problems(good) == []
    typo = json.loads(json.dumps(good))
    typo["spec"]["containers"][0]["imagePullPolcy"] = "IfNotPresent"
    assert any("imagePullPolcy" in p for p in model_problems(typo))
    snake_case = json.loads(json.dumps(good))
    snake_case["spec"]["service_account_name"] = snake_case["spec"].pop("serviceAccountName")
    assert any("service_account_name" in p for p in model_problems(snake_case))
    mistyped = json.loads(json.dumps(good))
    mistyped["spec"]["securityContext"]["runAsUser"] = str(IMAGE_UID)
    assert any("runAsUser" in p for p in model_problems(mistyped))
    missing = json.loads(json.dumps(good))
    del missing["spec"]["containers"][0]["name"]
    assert model_problems(missing) != []
    assert model_problems({"apiVersion": "apps/v1", "kind": "Frobnicator"}) != []


@pytest.mark.parametrize("name", YAML_FILES)
def test_namespaces_match_each_kinds_scope(name: str) -> None:
    for doc in documents(name):
        scope = api_scope(doc["apiVersion"], doc["kind"])
        namespace = (doc.get("metadata") or {}).get("namespace")
        where = f"{name}: {doc['kind']} {doc['metadata'].get('name')}"
        if scope == "namespaced":
            assert namespace, f"{where} is namespaced but names no namespace (apply as-is)"
        else:
            assert namespace is None, f"{where} is cluster-scoped but names a namespace"


# ----------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    kind: str
    name: str
    namespace: str
    pod: dict[str, Any]
    strategy: dict[str, Any] = field(default_factory=dict)
    min_ready_seconds: int = 0


def workloads(docs: list[dict[str, Any]]) -> list[Workload]:
    found = []
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] == "Pod":
            found.append(Workload("Pod", meta["name"], meta["namespace"], doc["spec"]))
        elif doc["kind"] in ("DaemonSet", "Deployment", "StatefulSet"):
            spec = doc["spec"]
            strategy = spec.get("updateStrategy") or spec.get("strategy") or {}
            found.append(Workload(doc["kind"], meta["name"], meta["namespace"],
                                  spec["template"]["spec"], strategy,
                                  spec.get("minReadySeconds", 0)))
    return found


def portproxy_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod["containers"] if "portproxy" in str(c.get("image", ""))]


def option_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def forward_specs(container: dict[str, Any]) -> list[str]:
    args = list(container.get("args") or [])
    specs = [a.split("=", 1)[1] for a in args if a.startswith("--forward=")]
    specs += [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-f", "--forward")]
    for env in container.get("env") or ():
        if env["name"] == "PORTPROXY_FORWARD":
            specs += env.get("value", "").split()
    return specs


def duration_seconds(text: str) -> float:
    from portproxy.spec_values import parse_duration

    return float(parse_duration(text))


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for entry in container.get("ports") or ():
        if entry.get("name") == port:
            return int(entry["containerPort"])
    raise AssertionError(f"probe port {port!r} names no container port")


@pytest.mark.parametrize("name", YAML_FILES)
def test_pod_specs_keep_the_promised_settings(name: str) -> None:
    found = workloads(documents(name))
    assert found, f"{name} runs no workload"
    for load in found:
        pod = load.pod
        where = f"{name}: {load.kind} {load.name}"
        containers = portproxy_containers(pod)
        assert containers, f"{where} has no portproxy container"
        if load.kind == "DaemonSet":
            assert load.strategy == {"type": "RollingUpdate",
                                     "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}, where
            # A surge pod needs the node's ports while the old pod holds them: a hostPort (and
            # on the host network every declared port becomes one) makes the scheduler refuse
            # it, and the rollout stalls. SO_REUSEPORT is what lets the two pods share.
            for container in pod.get("containers") or ():
                ports = container.get("ports") or ()
                assert not any(p.get("hostPort") for p in ports), f"{where}: hostPort"
                assert not (pod.get("hostNetwork") and ports), f"{where}: ports on hostNetwork"
        if pod.get("hostNetwork"):
            assert pod.get("dnsPolicy") == "ClusterFirstWithHostNet", where
        pod_security = pod.get("securityContext") or {}
        for container in containers:
            args = list(container.get("args") or [])
            assert args[:1] == ["run"], f"{where}: args must start with the run command"
            assert "command" not in container, f"{where}: keep the image's ENTRYPOINT"
            security = container.get("securityContext") or {}
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
            assert security.get("runAsUser", pod_security.get("runAsUser")) == IMAGE_UID
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities") == {"drop": ["ALL"],
                                                    "add": ["NET_BIND_SERVICE"]}, where
            assert security.get("privileged") in (None, False), where
            env = {e["name"]: e for e in container.get("env") or ()}
            assert env.get("NODE_NAME", {}).get("valueFrom") == {
                "fieldRef": {"fieldPath": "spec.nodeName"}}, f"{where}: NODE_NAME"
            admin = option_value(args, "--admin-address") or f":{ADMIN_PORT}"
            admin_port = int(admin.rpartition(":")[2])
            probes = [("livenessProbe", "/healthz")]
            if pod.get("hostNetwork"):
                # The rollout's two pods share the admin port: /readyz may answer for the
                # other one. Readiness comes from this pod's own file instead.
                check_ready_file_probe(where, pod, container, args)
            else:
                probes.append(("readinessProbe", "/readyz"))
            for probe, path in probes:
                http = (container.get(probe) or {}).get("httpGet") or {}
                assert http.get("path") == path, f"{where}: {probe}"
                assert port_number(container, http.get("port", 0)) == admin_port, where
            resources = container.get("resources") or {}
            assert resources.get("requests", {}).get("cpu"), f"{where}: cpu request"
            assert resources.get("requests", {}).get("memory"), f"{where}: memory request"
            assert resources.get("limits", {}).get("memory"), f"{where}: memory limit"
            drain = duration_seconds(option_value(args, "--drain-timeout") or "30s")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            assert grace > drain, f"{where}: grace {grace}s must outlast the {drain}s drain"
            if not pod.get("hostNetwork"):
                check_published_ports(where, container)


def check_ready_file_probe(where: str, pod: dict[str, Any], container: dict[str, Any],
                           args: list[str]) -> None:
    """An exec readiness probe testing the --ready-file, which lives on a writable volume
    (the root filesystem is read-only)."""
    ready_file = option_value(args, "--ready-file")
    assert ready_file, f"{where}: --ready-file"
    command = ((container.get("readinessProbe") or {}).get("exec") or {}).get("command")
    assert command == ["test", "-e", ready_file], f"{where}: readinessProbe {command}"
    volumes = {v["name"]: v for v in pod.get("volumes") or ()}
    mounts = [m for m in container.get("volumeMounts") or ()
              if ready_file.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts and not mounts[0].get("readOnly"), f"{where}: no writable mount for it"
    assert "emptyDir" in volumes.get(mounts[0]["name"], {}), f"{where}: an emptyDir"


def check_published_ports(where: str, container: dict[str, Any]) -> None:
    """Off the host network, every forwarded port must be published with a hostPort."""
    from portproxy.spec import parse_forward

    published = {(p.get("protocol", "TCP"), p["containerPort"])
                 for p in container.get("ports") or () if p.get("hostPort")}
    for spec in forward_specs(container):
        forward = parse_forward(spec)
        for protocol in forward.protocols:
            key = (protocol.value.upper(), forward.listen.port)
            assert key in published, f"{where}: {spec} needs a hostPort for {key}"


# ----------------------------------------------------------------------------- RBAC

def rbac_grants(docs: list[dict[str, Any]], account: tuple[str, str]
                ) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) → verbs granted to the ServiceAccount ``(namespace, name)`` by
    the roles of this file (a binding to a role defined elsewhere is an error)."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    grants: dict[tuple[str, str], set[str]] = {}
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        subjects = {(s.get("namespace"), s["name"]) for s in binding.get("subjects") or ()
                    if s["kind"] == "ServiceAccount"}
        if account not in subjects:
            continue
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], namespace, ref["name"]))
        assert role is not None, f"binding {binding['metadata']['name']} refers to {ref}"
        for rule in role.get("rules") or ():
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert "*" not in (group, resource, *rule["verbs"]), f"wildcard: {rule}"
                    grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


@pytest.mark.parametrize("name", YAML_FILES)
def test_rbac_is_the_minimum(name: str) -> None:
    docs = documents(name)
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"])
                for d in docs if d["kind"] == "ServiceAccount"}
    for load in workloads(docs):
        account = (load.namespace, load.pod.get("serviceAccountName", "default"))
        assert account in accounts, f"{name}: {load.name} uses {account}, not defined here"
        expected = dict(SERVICE_RULES)
        args = [a for c in portproxy_containers(load.pod) for a in c.get("args") or ()]
        if any(a.split("=", 1)[0] in CONFIGMAP_FLAGS for a in args):
            expected.update(CONFIGMAP_RULES)
        assert rbac_grants(docs, account) == expected, f"{name}: {load.name}"


def test_rbac_check_notices_extra_verbs() -> None:
    docs = documents("daemonset-hostnetwork.yaml")
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    role["rules"][0]["verbs"].append("delete")
    assert rbac_grants(docs, ("portproxy", "portproxy")) != SERVICE_RULES


# ----------------------------------------------------------------------------- CLI

def cli() -> Any:
    try:
        import portproxy.cli as module
    except ImportError as exc:
        pytest.skip(f"portproxy.cli cannot be imported yet: {exc}")
    return module


def command_options(command: click.Command) -> dict[str, click.Parameter]:
    return {opt: param for param in command.params for opt in param.opts}


def split_for_check(args: list[str]) -> list[str]:
    """``run`` ARGS → ``check --offline`` ARGS: the options ``check`` also has, in order.

    Unknown flags fail, except DESIGN §1 flags the CLI does not have yet, which skip.
    """
    module = cli()
    run_options = command_options(module.main.commands["run"])
    check_command = module.main.commands.get("check")
    if check_command is None:
        pytest.skip("the CLI has no `check` command yet")
    check_options = command_options(check_command)
    if "--offline" not in check_options:
        pytest.skip("`portproxy check` has no --offline yet")
    assert args[:1] == ["run"], f"expected a run command line, got {args}"
    kept = ["check", "--offline"]
    tokens = iter(args[1:])
    for token in tokens:
        flag, has_value, _ = token.partition("=")
        param = run_options.get(flag)
        if param is None:
            if flag in CONTRACT_FLAGS:
                pytest.skip(f"the CLI has no {flag} yet (DESIGN §1); the example uses it")
            raise AssertionError(f"unknown flag {flag!r} in {args}")
        takes_value = not (isinstance(param, click.Option) and param.is_flag)
        words = [token]
        if takes_value and not has_value:
            words.append(next(tokens))
        if flag in check_options:
            kept += words
    return kept


def clean_env(extra: dict[str, str]) -> dict[str, str | None]:
    """Our environment without PORTPROXY_* (they would leak into the check), plus ``extra``."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PORTPROXY_")}
    env.update(extra)
    return env


def parse_as_run(args: list[str], env: dict[str, str]) -> None:
    """Every argument through ``run``'s own click parameters (types, choices, ranges, the
    config file), stopping before the daemon would start."""
    run = cli().main.commands["run"]
    for arg in args[1:]:
        flag = arg.partition("=")[0]
        if flag.startswith("-") and flag not in command_options(run) and flag in CONTRACT_FLAGS:
            pytest.skip(f"the CLI has no {flag} yet (DESIGN §1); the example uses it")
    seen: dict[str, Any] = {}
    parse_only = click.Command("run", params=run.params, callback=lambda **kw: seen.update(kw))
    result = CliRunner().invoke(parse_only, args[1:], env=clean_env(env))
    assert result.exit_code == 0, f"run {shlex.join(args[1:])}:\n{result.output}"
    assert seen, "the parse-only run command did not complete"


CHECK_IN_NETNS = """
import json, sys
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
from click.testing import CliRunner
from portproxy.cli import main
args, env = json.loads(sys.argv[1]), json.loads(sys.argv[2])
result = CliRunner().invoke(main, args, env=env)
detail = "" if result.exception is None or isinstance(result.exception, SystemExit) \\
    else repr(result.exception)
print(json.dumps({"exit_code": result.exit_code, "output": result.output + detail}))
"""


def run_check(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``portproxy check --offline`` through CliRunner: as root inside a fresh network
    namespace (every port free), otherwise here (privileged binds may then fail: skip)."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        helper = subprocess.run(
            ["unshare", "--net", sys.executable, "-c", CHECK_IN_NETNS, json.dumps(args),
             json.dumps(clean_env(env))],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert helper.returncode == 0, f"check helper failed:\n{helper.stdout}{helper.stderr}"
        outcome = json.loads(helper.stdout.strip().splitlines()[-1])
        return int(outcome["exit_code"]), str(outcome["output"])
    result = CliRunner().invoke(cli().main, args, env=clean_env(env))
    if result.exit_code == 3:
        pytest.skip(f"bind-test failed here (not root, no private netns):\n{result.output}")
    return result.exit_code, result.output


def validate_command_line(args: list[str], env: dict[str, str]) -> None:
    check_args = split_for_check(args)
    parse_as_run(args, env)
    code, output = run_check(check_args, env)
    assert code == 0, f"{shlex.join(check_args)} exited {code}:\n{output}"


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for entry in container.get("env") or ():
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif entry["name"] == "NODE_NAME":
            env["NODE_NAME"] = NODE_NAME
    return env


def yaml_command_lines() -> Iterator[Any]:
    for name in YAML_FILES:
        for load in workloads(documents(name)):
            for container in portproxy_containers(load.pod):
                yield pytest.param(list(container.get("args") or []), container_env(container),
                                   id=f"{name}:{load.name}:{container['name']}")


@pytest.mark.parametrize(("args", "env"), list(yaml_command_lines()))
def test_yaml_container_args_pass_cli_validation(args: list[str], env: dict[str, str]) -> None:
    validate_command_line(args, env)


def test_cli_validation_rejects_a_broken_forward() -> None:
    args = ["run", "--forward=tcp://:80=web/frontend:http,balance=fastest"]
    with pytest.raises(AssertionError, match="exited 2"):
        validate_command_line(args, {})


# ----------------------------------------------------------------------------- docker-run.sh

FAKE_RUNTIME = """#!{python}
import json, sys
with open({out!r}, "w") as stream:
    json.dump(sys.argv[1:], stream)
"""
SCRIPT_IMAGE = "portproxy-example-under-test:1"


def test_docker_run_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(EXAMPLES / "docker-run.sh")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def docker_run_argv(tmp_path: Path, kubeconfig: Path | None) -> list[str]:
    """What docker-run.sh hands to the container runtime (a stand-in that records argv)."""
    out = tmp_path / "argv.json"
    runtime = tmp_path / "fake-runtime"
    runtime.write_text(FAKE_RUNTIME.format(python=sys.executable, out=str(out)))
    runtime.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUNTIME": str(runtime),
           "IMAGE": SCRIPT_IMAGE, "HOME": str(tmp_path)}
    if kubeconfig is not None:
        env["KUBECONFIG_FILE"] = str(kubeconfig)
    result = subprocess.run(["bash", str(EXAMPLES / "docker-run.sh")], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    argv = json.loads(out.read_text())
    assert isinstance(argv, list)
    return [str(a) for a in argv]


@pytest.mark.parametrize("with_kubeconfig", [False, True], ids=["static", "kubeconfig"])
def test_docker_run_args_pass_cli_validation(tmp_path: Path, with_kubeconfig: bool) -> None:
    kubeconfig = None
    if with_kubeconfig:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n"
                              "users: []\n")
    argv = docker_run_argv(tmp_path, kubeconfig)
    assert argv[0] == "run" and SCRIPT_IMAGE in argv, argv
    split = argv.index(SCRIPT_IMAGE)
    runtime_opts, args = argv[1:split], argv[split + 1:]
    joined = " ".join(runtime_opts)
    for needed in ("--network host", "--cap-drop ALL", "--cap-add NET_BIND_SERVICE",
                   "--read-only"):
        assert needed in joined, f"docker-run.sh lacks {needed}: {joined}"
    assert "--user" not in runtime_opts and "--privileged" not in runtime_opts
    # Paths inside the container map back to the host files mounted there.
    mounts = {}
    for index, opt in enumerate(runtime_opts[:-1]):
        if opt in ("-v", "--volume"):
            source, target = runtime_opts[index + 1].split(":")[:2]
            mounts[target] = source
    args = [mounts.get(arg, arg) for arg in args]
    if kubeconfig is not None:
        assert str(kubeconfig) in args, "the kubeconfig is mounted and passed to portproxy"
    validate_command_line(args, {})


# ----------------------------------------------------------------------------- config.toml

def test_config_toml_passes_cli_validation() -> None:
    args = ["run", "--config", str(EXAMPLES / "config.toml")]
    validate_command_line(args, {})


def test_config_toml_shows_every_option() -> None:
    text = (EXAMPLES / "config.toml").read_text(encoding="utf-8")
    shown = set(re.findall(r"^[#\s]*([a-z][a-z0-9-]*)\s*=", text, re.M))
    from portproxy.spec import OPTION_KEYS

    wanted = {flag.removeprefix("--") for flag in CONTRACT_FLAGS} - {"config"}
    wanted |= set(OPTION_KEYS)
    run = cli().main.commands["run"]
    wanted |= {opt.removeprefix("--") for p in run.params for opt in p.opts
               if opt.startswith("--") and p.name not in ("forwards", "config", "help")}
    assert wanted - shown == set(), "config.toml should show these options"
