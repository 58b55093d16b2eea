"""In-cluster configuration: service account token + CA, KUBERNETES_SERVICE_HOST/PORT, real TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from portproxy.errors import ResolveError
from portproxy.resolve.kubernetes import KubeResolvers
from portproxy.spec import ServiceTarget, TargetMode
from tests.k8s.conftest import Collector, ep, fast_settings, hosts
from tests.k8s.fakeapi import FakeKube

TOKEN = "in-cluster-token"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca_and_cert(where: Path, name: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    where.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=where)
    (where / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf",
            cwd=where)
    return where / "ca.crt", where / "server.crt", where / "server.key"


@pytest.fixture
def tls_fake(tmp_path: Path) -> Iterator[tuple[FakeKube, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a throw-away CA (apt-get install openssl)")
    ca, cert, key = make_ca_and_cert(tmp_path / "pki", "portproxy-test-ca")
    with FakeKube(token=TOKEN, tls=(str(cert), str(key))).serving() as api:
        yield api, ca


def service_account(where: Path, ca: Path, token: str = TOKEN) -> Path:
    where.mkdir()
    (where / "token").write_text(token)
    (where / "namespace").write_text("portproxy")
    shutil.copy(ca, where / "ca.crt")
    return where


def test_in_cluster_config_over_tls(tls_fake, tmp_path, monkeypatch) -> None:
    fake, ca = tls_fake
    fake.service("web", "frontend", [{"name": "http", "port": 80}])
    fake.endpoint_slice("web", "frontend", "a", [ep("10.1.0.1")], [{"name": "http",
                                                                    "port": 8080}])
    sa = service_account(tmp_path / "sa", ca)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    settings = fast_settings(None, tmp_path, serviceaccount_dir=str(sa))
    target = ServiceTarget("web", "frontend", "http")

    async def main() -> None:
        kube = KubeResolvers(settings)
        c = Collector(kube.resolver(target, TargetMode.ENDPOINTS).watch())
        try:
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.1:8080"])
            fake.endpoint_slice("web", "frontend", "a", [ep("10.1.0.1"), ep("10.1.0.2")],
                                [{"name": "http", "port": 8080}])
            await c.wait_for(lambda s: len(s) == 2)
            assert hosts(await kube.check_once(target, TargetMode.ENDPOINTS)) == [
                "10.1.0.1:8080", "10.1.0.2:8080"]
        finally:
            await c.close()
            await kube.close()

    asyncio.run(main())
    with fake.cond:
        assert {(r.authorization or "").lower() for r in fake.requests} == {
            f"bearer {TOKEN}"}


def test_in_cluster_with_an_untrusted_ca_fails_clearly(tls_fake, tmp_path, monkeypatch) -> None:
    fake, _ = tls_fake
    fake.service("web", "frontend", [{"name": "http", "port": 80}])
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other", "some-other-ca")
    sa = service_account(tmp_path / "sa", other_ca)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
    settings = fast_settings(None, tmp_path, serviceaccount_dir=str(sa))

    async def main() -> None:
        kube = KubeResolvers(settings)
        with pytest.raises(ResolveError, match="cannot reach the Kubernetes API at https://"):
            await kube.check_once(ServiceTarget("web", "frontend", 80), TargetMode.CLUSTERIP)
        await kube.close()

    asyncio.run(main())
    with fake.cond:
        assert not fake.requests  # nothing was sent over an unverified connection
