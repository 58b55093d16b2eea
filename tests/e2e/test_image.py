"""The container image, built and run for real with podman.

Builds the Dockerfile, runs the image as its non-root user with host networking and only
NET_BIND_SERVICE, forwards a privileged port on a loopback address to a backend started here,
checks the bytes, /readyz, and that SIGTERM leads to exit 0 after the open connection drained.

Needs root and podman with a local ``debian:bookworm-slim`` (``../shared/container/make-base.sh``
prepares both without a registry); otherwise every test here skips and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import socket
import socketserver
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
# The host's CA bundle, handed to the build as a secret for TLS-intercepting proxies.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_UID = 10001
CAP_NET_BIND_SERVICE = 1 << 10
DRAIN_TIMEOUT_S = 15
# podman's own start/stop overhead on top of the drain timeout before we call it hung.
PODMAN_SLACK_S = 20
BUILD_TIMEOUT_S = 1200
# A budget that catches a compiler, pip cache or second Python sneaking into the image.
MAX_IMAGE_BYTES = 350 * 1000 * 1000


def podman(*args: str, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def unusable_reason() -> str | None:
    """Why the image cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root: podman with host networking and a privileged port"
    if shutil.which("podman") is None:
        return "podman is not installed (run ../shared/container/make-base.sh as root)"
    try:
        exists = podman("image", "exists", BASE_IMAGE, check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return "podman does not answer (podman image exists timed out)"
    if exists.returncode != 0:
        return (f"{BASE_IMAGE} is not in local storage "
                "(run ../shared/container/make-base.sh as root)")
    return None


def package_version() -> str:
    text = (REPO / "portproxy" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert match, "portproxy/__init__.py has no __version__"
    return match.group(1)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    tag = f"localhost/portproxy-test:{uuid.uuid4().hex[:12]}"
    # --layers=false: no cached stage images stay behind (the pip step reruns on every source
    # change anyway, so the cache would save seconds and leave ~400 MB per run).
    args = ["build", "--pull=never", "--network", "host", "--layers=false",
            "--build-arg", f"VERSION={package_version()}", "-t", tag, "-f",
            str(REPO / "Dockerfile")]
    if CA_BUNDLE.is_file():
        args += ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"]
    try:
        result = podman(*args, str(REPO), timeout=BUILD_TIMEOUT_S, check=False)
        assert result.returncode == 0, (
            f"podman build failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}")
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)


def inspect_image(tag: str) -> dict[str, Any]:
    data = json.loads(podman("image", "inspect", tag).stdout)
    assert isinstance(data, list) and len(data) == 1
    return dict(data[0])


def test_image_metadata_and_contents(image: str) -> None:
    info = inspect_image(image)
    config = info["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["portproxy"]
    labels = config.get("Labels") or {}
    assert labels.get("org.opencontainers.image.title") == "portproxy"
    assert labels.get("org.opencontainers.image.version") == package_version()
    assert labels.get("org.opencontainers.image.licenses")
    assert info["Size"] < MAX_IMAGE_BYTES, f"image is {info['Size']} bytes"
    print(f"image size: {info['Size'] / 1e6:.1f} MB")

    version = podman("run", "--rm", "--network", "none", image, "--version")
    assert package_version() in version.stdout

    # No compilers, no pip, no caches, no baked-in CA bundle from the build secret; the
    # interpreter carries cap_net_bind_service so non-root binds work without ambient caps.
    probe = (
        "import importlib.util, os, shutil, sys\n"
        "print(json.dumps({\n"
        "  'tools': [t for t in ('gcc', 'cc', 'c++', 'make', 'pip', 'pip3') if shutil.which(t)],\n"
        "  'secret': os.path.exists('/run/secrets/ca_bundle'),\n"
        "  'caches': [p for p in ('/root/.cache', '/src') if os.path.exists(p)],\n"
        "  'fcaps': os.getxattr(os.path.realpath(sys.executable), 'security.capability').hex(),\n"
        "  'uid': os.getuid(),\n"
        "  'unused': [m for m in ('aiohttp', 'yarl', 'multidict', 'kubernetes.aio')\n"
        "             if importlib.util.find_spec(m) is not None],\n"
        "}))\n"
    )
    result = podman("run", "--rm", "--network", "none", "--cap-drop", "ALL", "--cap-add",
                    "NET_BIND_SERVICE", "--entrypoint", "python3", image, "-c",
                    "import json\n" + probe)
    facts = json.loads(result.stdout)
    assert facts["tools"] == []
    assert facts["secret"] is False
    assert facts["caches"] == []
    assert facts["uid"] == IMAGE_UID
    assert facts["unused"] == []  # the asyncio API client and its dependencies, never imported
    # vfs_cap_data v2: magic|effective flag, then permitted bits 0-31 (little endian)
    permitted = int.from_bytes(bytes.fromhex(facts["fcaps"])[4:8], "little")
    assert permitted == CAP_NET_BIND_SERVICE

    # The hostNetwork examples' readiness probe is `test -e READY_FILE`, run in the image.
    for path, code in (("/", 0), ("/no/such/ready", 1)):
        probe_run = podman("run", "--rm", "--network", "none", "--cap-drop", "ALL",
                           "--cap-add", "NET_BIND_SERVICE", "--entrypoint", "test", image,
                           "-e", path, check=False)
        assert probe_run.returncode == code, probe_run.stderr


# Docker and Kubernetes (unlike podman) give a non-root process no ambient capabilities: only
# the interpreter's file capability lets it bind port 80. setpriv reproduces that start: uid
# 10001, bounding set {NET_BIND_SERVICE}, inheritable and ambient empty, no_new_privs (what
# allowPrivilegeEscalation: false sets). The same interpreter copied without its file
# capability must fail, or the first half proves nothing.
BIND_80 = "import socket; socket.socket().bind(('127.0.0.1', 80)); print('bound')"
DROP_TO_NON_ROOT = ["setpriv", "--reuid", str(IMAGE_UID), "--regid", str(IMAGE_UID),
                    "--clear-groups", "--inh-caps", "-all", "--ambient-caps", "-all",
                    "--bounding-set", "-all,+net_bind_service", "--no-new-privs"]


def test_file_capability_binds_without_ambient_caps(image: str) -> None:
    script = (f'cp "$(readlink -f /usr/bin/python3)" /tmp/plain-python; '
              f'{shlex.join(DROP_TO_NON_ROOT)} python3 -c "{BIND_80}"; '
              f'{shlex.join(DROP_TO_NON_ROOT)} /tmp/plain-python -c "{BIND_80}" 2>&1 '
              "| tail -1")
    result = podman("run", "--rm", "--network", "none", "--user", "0", "--cap-drop", "ALL",
                    "--cap-add", "NET_BIND_SERVICE,SETUID,SETGID,SETPCAP",
                    "--entrypoint", "sh", image, "-c", script)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "bound", result.stdout + result.stderr
    assert "PermissionError" in lines[-1], result.stdout + result.stderr


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo every byte; pass the client's FIN on as our own (half-close)."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        while chunk := sock.recv(65536):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def backend() -> Iterator[tuple[str, int]]:
    server = EchoServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, name="echo-backend", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def free_port(host: str, candidates: list[int]) -> int:
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise AssertionError(f"no free port on {host} among {candidates}")


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` while reading the echo (the backend streams it straight back)."""
    received = bytearray()
    view = memoryview(payload)
    sock.setblocking(True)
    sender = threading.Thread(target=sock.sendall, args=(view,), daemon=True)
    sender.start()
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sender.join(30)
    return bytes(received)


def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """One full connection: send, half-close, read the echo to EOF."""
    with socket.create_connection(address, timeout=30) as sock:
        echoed = roundtrip(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        rest = bytearray()
        while chunk := sock.recv(65536):
            rest += chunk
        return echoed + bytes(rest)


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def state(self) -> dict[str, Any]:
        data = json.loads(podman("container", "inspect", self.name).stdout)
        return dict(data[0]["State"])

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def proc_status(self) -> dict[str, str]:
        pid = self.state()["Pid"]
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"portproxy-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def readyz(address: tuple[str, int]) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/readyz",
                                    timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def test_runs_non_root_on_privileged_port_and_drains_on_sigterm(
        image: str, backend: tuple[str, int], container_name: str) -> None:
    # A loopback address of our own, so port 80 is free whatever else runs on 127.0.0.1.
    host = f"127.{random.randint(64, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    port = free_port(host, [80, 443, *random.sample(range(600, 1024), 20)])
    admin = (host, free_port(host, [0]))
    listen = (host, port)
    # As the Kubernetes examples run it: read-only root, no privilege escalation.
    podman("run", "-d", "--name", container_name, "--network", "host",
           "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", "--read-only",
           "--security-opt", "no-new-privileges", image,
           "run", "-f", f"tcp://{host}:{port}={backend[0]}:{backend[1]}",
           "--admin-address", f"{admin[0]}:{admin[1]}",
           "--drain-timeout", f"{DRAIN_TIMEOUT_S}s")
    box = Container(container_name)

    def ready() -> bool:
        if not box.state()["Running"]:
            raise AssertionError(f"container exited early:\n{box.logs()}")
        return readyz(admin) == 200

    wait_for(ready, timeout=60, what="/readyz 200", interval=0.2)

    status = box.proc_status()
    assert all(int(uid) == IMAGE_UID for uid in status["Uid"].split()), status["Uid"]
    assert int(status["CapBnd"], 16) == CAP_NET_BIND_SERVICE
    assert int(status["CapEff"], 16) & ~CAP_NET_BIND_SERVICE == 0

    rng = random.Random(9)
    for size in (1, 4096, 1 << 20):
        payload = rng.randbytes(size)
        assert exchange(listen, payload) == payload, f"{size}-byte echo differs"

    # A connection open across SIGTERM keeps working while the daemon drains.
    with socket.create_connection(listen, timeout=30) as held:
        first = rng.randbytes(65536)
        assert roundtrip(held, first) == first
        podman("kill", "--signal", "TERM", container_name)
        second = rng.randbytes(65536)
        assert roundtrip(held, second) == second, f"held connection broke:\n{box.logs()}"
        held.shutdown(socket.SHUT_WR)
        assert held.recv(1) == b""

    with contextlib.suppress(subprocess.TimeoutExpired):
        podman("wait", container_name, timeout=DRAIN_TIMEOUT_S + PODMAN_SLACK_S, check=False)
    state = box.state()
    assert not state["Running"], (
        f"still running {DRAIN_TIMEOUT_S + PODMAN_SLACK_S}s after SIGTERM:\n{box.logs()}")
    assert state["ExitCode"] == 0, f"exit code {state['ExitCode']}:\n{box.logs()}"
