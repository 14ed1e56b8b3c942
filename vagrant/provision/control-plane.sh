#!/usr/bin/env bash
# The control plane: kubeadm init with the CA made by the Vagrantfile, a pod CIDR
# and the lab's kube-proxy settings, then the CNI (flannel on the private network).
# Env: NODE_IP, NODE_NAME, K8S_VERSION, CA_CERT_B64, CA_KEY_B64, JOIN_TOKEN,
#      JOIN_TOKEN_TTL, POD_CIDR, SERVICE_CIDR, CNI_MANIFEST, NETWORK_REGEX; LOCAL_BOX=1 with
#      labkit's own box (no CNI is downloaded: its pods are on the node's own bridge).
set -euo pipefail

: "${NODE_IP:?}" "${NODE_NAME:?}" "${K8S_VERSION:?}" "${CA_CERT_B64:?}" "${CA_KEY_B64:?}"
: "${JOIN_TOKEN:?}" "${JOIN_TOKEN_TTL:?}" "${POD_CIDR:?}" "${SERVICE_CIDR:?}"
: "${CNI_MANIFEST:?}" "${NETWORK_REGEX:?}"
manifests=/tmp/labkit/k8s-manifests

if [ ! -f /etc/kubernetes/admin.conf ]; then
    install -d -m 0755 /etc/kubernetes/pki
    echo "$CA_CERT_B64" | base64 -d > /etc/kubernetes/pki/ca.crt
    (umask 077 && echo "$CA_KEY_B64" | base64 -d > /etc/kubernetes/pki/ca.key)

    config=$(mktemp /tmp/kubeadm-init.XXXXXX.yaml)
    cat > "$config" <<CONFIG
apiVersion: kubeadm.k8s.io/v1beta3
kind: InitConfiguration
bootstrapTokens:
  - token: "${JOIN_TOKEN}"
    ttl: "${JOIN_TOKEN_TTL}"
    usages: [signing, authentication]
    groups: ["system:bootstrappers:kubeadm:default-node-token"]
localAPIEndpoint:
  advertiseAddress: ${NODE_IP}
  bindPort: 6443
nodeRegistration:
  name: ${NODE_NAME}
  criSocket: unix:///run/containerd/containerd.sock
  kubeletExtraArgs:
    node-ip: ${NODE_IP}
---
apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
kubernetesVersion: v${K8S_VERSION}
controlPlaneEndpoint: ${NODE_IP}:6443
apiServer:
  certSANs: [${NODE_IP}]
networking:
  podSubnet: ${POD_CIDR}
  serviceSubnet: ${SERVICE_CIDR}
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
---
CONFIG
    # kube-proxy in iptables mode, leaving nf_conntrack_max to the lab
    grep -v '^#' "$manifests/kube-proxy-config.yaml" >> "$config"
    kubeadm init --config "$config"
    rm -f "$config"
fi

# kubectl for root and for the vagrant user (labkit runs kubectl as vagrant)
install -d -m 0700 /root/.kube
cp /etc/kubernetes/admin.conf /root/.kube/config
install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.kube
install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config
export KUBECONFIG=/etc/kubernetes/admin.conf

if [ "${LOCAL_BOX:-}" = 1 ]; then
    kubectl wait --for=condition=Ready "node/${NODE_NAME}" --timeout=300s
    echo "control-plane: ready at https://${NODE_IP}:6443 (local box: no CNI downloaded)"
    exit 0
fi

# flannel, on the interface whose address is on the private network
cni=$(mktemp /tmp/cni.XXXXXX.yaml)
curl -fsSL "$CNI_MANIFEST" -o "$cni"
sed -E -i "s|^( *)- --kube-subnet-mgr$|&\n\1- --iface-regex=${NETWORK_REGEX}|" "$cni"
grep -q -- "--iface-regex=" "$cni" || { echo "control-plane: could not set flannel's interface" >&2; exit 1; }
kubectl apply -f "$cni"
rm -f "$cni"

kubectl wait --for=condition=Ready "node/${NODE_NAME}" --timeout=300s
echo "control-plane: ready at https://${NODE_IP}:6443"
