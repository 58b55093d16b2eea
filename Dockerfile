# portproxy container image.
#
#   podman build --pull=never --network host -t portproxy:latest .
#   # behind a TLS-intercepting proxy, hand pip the host's CA bundle for this build only:
#   podman build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt -t portproxy:latest .
# (Docker: BuildKit, i.e. `docker buildx build`; the legacy builder cannot take --secret.)
#
# Two stages: the builder makes a virtualenv in /opt/venv and installs the package and its
# (pure-Python or wheel-only) dependencies; the runtime stage is bookworm-slim plus the
# distribution's python3 and that venv. No compiler, no pip, no caches, no CA bundle of ours.

ARG BASE=debian:bookworm-slim

# ------------------------------------------------------------------------------ builder
FROM ${BASE} AS builder
# python3-venv brings ensurepip so the venv gets a pip of its own; nothing needs compiling
# (every dependency ships wheels), so no build-essential.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
COPY . /src
# Optional extras, e.g. --build-arg EXTRAS=fast for uvloop.
ARG EXTRAS=
# The ca_bundle secret is mounted only for this RUN and never lands in a layer; without the
# secret the file is absent and pip uses its own certifi bundle.
RUN --mount=type=secret,id=ca_bundle \
    set -eu; \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore; \
    /opt/venv/bin/pip install "/src${EXTRAS:+[$EXTRAS]}"; \
    # kubernetes>=35 ships a second, asyncio copy of the whole API client (~70 MB with its
    # bytecode) that nothing else imports; portproxy uses the sync client, so drop it unless
    # the package starts importing it, and with it aiohttp and the packages only aiohttp
    # needs (~13 MB; the sync client never imports them).
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
    if ! grep -rqE 'kubernetes[.]aio|from kubernetes import .*aio|aiohttp' /src/portproxy; then \
        rm -rf "$site/kubernetes/aio"; \
        /opt/venv/bin/pip uninstall -y aiohttp aiohttp-retry aiohappyeyeballs aiosignal \
            attrs frozenlist multidict propcache yarl; \
    fi; \
    /opt/venv/bin/pip uninstall -y pip setuptools; \
    # byte-compile everything now: the root filesystem is read-only at run time
    /opt/venv/bin/python -m compileall -q /opt/venv/lib >/dev/null; \
    /opt/venv/bin/portproxy --version

# ------------------------------------------------------------------------------ runtime
FROM ${BASE}
ARG VERSION=dev
ARG REVISION=
ARG CREATED=
LABEL org.opencontainers.image.title="portproxy" \
      org.opencontainers.image.description="A small, fast, Kubernetes-native L4 TCP/UDP port forwarder" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# Only the interpreter. The file capability lets the non-root user bind ports < 1024 when the
# runtime puts NET_BIND_SERVICE into the bounding set but not into the ambient set (Docker and
# Kubernetes do exactly that for non-root users; podman also sets the ambient set). It works
# with allowPrivilegeEscalation=false because the capability is already in the permitted set
# before exec. Consequence: the container must keep NET_BIND_SERVICE (`--cap-drop ALL
# --cap-add NET_BIND_SERVICE`); with every capability dropped, exec fails with EPERM.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 libcap2-bin \
 && setcap cap_net_bind_service=+ep "$(readlink -f /usr/bin/python3)" \
 && DEBIAN_FRONTEND=noninteractive apt-get purge -y --auto-remove libcap2-bin \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 10001 portproxy \
 && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
            --home-dir /nonexistent --shell /usr/sbin/nologin portproxy

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Numeric UID:GID so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 9753/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["portproxy"]
CMD ["--help"]
