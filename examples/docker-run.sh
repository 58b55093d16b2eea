#!/usr/bin/env bash
# portproxy on a single host with Docker or podman: a node outside Kubernetes, or one that
# reaches a cluster through a kubeconfig. Host networking, so the ports below are the host's.
#
#   ./examples/docker-run.sh                         # static and DNS targets only
#   KUBECONFIG_FILE=~/.kube/portproxy.conf ./examples/docker-run.sh
#                                                    # plus a Kubernetes Service target
#   RUNTIME=podman IMAGE=localhost/portproxy:latest ./examples/docker-run.sh
#
# Then: curl -s localhost:9753/forwards ; docker logs -f portproxy ; docker stop portproxy
# (SIGTERM: stops accepting, drains open connections for up to --drain-timeout, exits 0).
set -euo pipefail

RUNTIME=${RUNTIME:-docker}
IMAGE=${IMAGE:-portproxy:latest}
NAME=${NAME:-portproxy}
KUBECONFIG_FILE=${KUBECONFIG_FILE:-}

# Non-root (the image's UID 10001) with one capability: binding ports below 1024.
# --read-only and no-new-privileges match the Kubernetes examples' securityContext.
run_opts=(
  --detach --name "$NAME" --restart unless-stopped
  --network host
  --cap-drop ALL --cap-add NET_BIND_SERVICE
  --security-opt no-new-privileges
  --read-only
  # `docker stop` waits this long before SIGKILL: longer than --drain-timeout.
  --stop-timeout 45
)

portproxy_args=(
  run
  # A static backend: host port 80 to an address on the LAN.
  --forward "tcp://:80=192.0.2.10:8080,balance=least-conn"
  # A DNS name (re-resolved periodically, every address becomes an endpoint), UDP syslog.
  --forward "udp://:514=logs.example.internal:514,idle-timeout=10s"
  --admin-address 127.0.0.1:9753
  --drain-timeout 30s
  --log-format json
)

if [ -n "$KUBECONFIG_FILE" ]; then
  # The file must be readable by UID 10001 inside the container (chmod 0644, or a copy
  # owned by 10001); mounted read-only.
  run_opts+=(--volume "$KUBECONFIG_FILE:/etc/portproxy/kubeconfig:ro")
  # The client writes a kubeconfig's inline certificates and keys (certificate-authority-data,
  # client-key-data) to temporary files: give the read-only container a small private /tmp.
  run_opts+=(--tmpfs /tmp:rw,noexec,nosuid,size=1m)
  portproxy_args+=(
    --kubeconfig /etc/portproxy/kubeconfig
    # A Service through the API: this host forwards 6379 to the Redis pods of namespace cache.
    --forward "tcp://:6379=cache/redis:6379"
  )
fi

exec "$RUNTIME" run "${run_opts[@]}" "$IMAGE" "${portproxy_args[@]}"
