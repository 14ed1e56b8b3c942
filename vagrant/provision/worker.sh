#!/usr/bin/env bash
# A worker: join the cluster (the CA's key hash pinned, no unverified discovery),
# build the TFTP server image from k8s-manifests/image into containerd, and
# install what the lab runs on the node itself (the plain server of iteration 1,
# python3 for the monitor's agent).
# Env: NODE_IP, NODE_NAME, CONTROL_PLANE_IP, CA_CERT_B64, JOIN_TOKEN, CA_CERT_HASH, FILE_SIZE;
# LOCAL_BOX=1 with labkit's own box, which holds the served file (nothing is downloaded or built).
set -euo pipefail

: "${NODE_IP:?}" "${NODE_NAME:?}" "${CONTROL_PLANE_IP:?}" "${CA_CERT_B64:?}"
: "${JOIN_TOKEN:?}" "${CA_CERT_HASH:?}" "${FILE_SIZE:?}"
export DEBIAN_FRONTEND=noninteractive
image=localhost/labkit/tftp-server:latest

if [ "${LOCAL_BOX:-}" = 1 ]; then
    [ -s "/srv/tftp/file-${FILE_SIZE}.bin" ] || { echo "worker: the local box has no /srv/tftp/file-${FILE_SIZE}.bin" >&2; exit 1; }
else
    apt-get install -y -q --no-install-recommends buildah tftpd-hpa python3
fi
# the plain server (iteration 1) is started by labkit on the node's address only
systemctl disable --now tftpd-hpa

# the TFTP server image, built here and handed to containerd (nothing is pulled)
if [ "${LOCAL_BOX:-}" != 1 ] && ! ctr -n k8s.io images ls -q | grep -qx "$image"; then
    archive=$(mktemp /tmp/tftp-server.XXXXXX.tar)
    rm -f "$archive"
    buildah build --layers -t "$image" \
        --build-arg "FILE_SIZE=${FILE_SIZE}" --build-arg "FILE_NAME=file-${FILE_SIZE}.bin" \
        -f /tmp/labkit/k8s-manifests/image/Containerfile /tmp/labkit/k8s-manifests/image
    buildah push "$image" "docker-archive:${archive}:${image}"
    ctr -n k8s.io images import "$archive"
    rm -f "$archive"
fi

if [ ! -f /etc/kubernetes/kubelet.conf ]; then
    ca=$(mktemp /tmp/cluster-ca.XXXXXX.crt)
    echo "$CA_CERT_B64" | base64 -d > "$ca"
    # wait for the API server, verifying it against the cluster CA
    for _ in $(seq 1 120); do
        curl -fsS --cacert "$ca" "https://${CONTROL_PLANE_IP}:6443/readyz" >/dev/null 2>&1 && break
        sleep 5
    done
    rm -f "$ca"
    config=$(mktemp /tmp/kubeadm-join.XXXXXX.yaml)
    cat > "$config" <<CONFIG
apiVersion: kubeadm.k8s.io/v1beta3
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: ${CONTROL_PLANE_IP}:6443
    token: "${JOIN_TOKEN}"
    caCertHashes: ["${CA_CERT_HASH}"]
nodeRegistration:
  name: ${NODE_NAME}
  criSocket: unix:///run/containerd/containerd.sock
  kubeletExtraArgs:
    node-ip: ${NODE_IP}
CONFIG
    kubeadm join --config "$config"
    rm -f "$config"
fi
if [ "${LOCAL_BOX:-}" = 1 ]; then
    echo "${NODE_NAME}: joined; the served file is in the box"
else
    echo "${NODE_NAME}: joined; image ${image} loaded"
fi
