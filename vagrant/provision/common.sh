#!/usr/bin/env bash
# Every Kubernetes VM: kernel modules and sysctls, containerd, and a pinned
# kubeadm/kubelet/kubectl from the Kubernetes package repository (pkgs.k8s.io).
# Env: K8S_VERSION (1.31.4), K8S_PKG_REVISION (1.1), NODE_IP; LOCAL_BOX=1 with labkit's own
# box, which holds everything (nothing is downloaded: the VMs have no route off the machine).
set -euo pipefail

: "${K8S_VERSION:?}" "${K8S_PKG_REVISION:?}" "${NODE_IP:?}"
minor=${K8S_VERSION%.*}
export DEBIAN_FRONTEND=noninteractive

# k8s-manifests, uploaded as one archive by the Vagrantfile, to /tmp/labkit/k8s-manifests
rm -rf /tmp/labkit
install -d -m 0755 /tmp/labkit
tar -xzf /tmp/labkit-k8s-manifests.tar.gz -C /tmp/labkit --no-same-owner

# kubelet refuses to run with swap on
swapoff -a
sed -i '/\sswap\s/s/^/#/' /etc/fstab

# br_netfilter for bridged pod traffic; conntrack and its TFTP helpers for the lab
cat > /etc/modules-load.d/labkit-k8s.conf <<'MODULES'
overlay
br_netfilter
nf_conntrack
nf_conntrack_tftp
nf_nat_tftp
MODULES
for module in overlay br_netfilter nf_conntrack nf_conntrack_tftp nf_nat_tftp; do
    modprobe "$module"
done
cat > /etc/sysctl.d/80-labkit-k8s.conf <<'SYSCTLS'
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.ip_forward = 1
SYSCTLS
sysctl --system >/dev/null

if [ "${LOCAL_BOX:-}" = 1 ]; then
    for tool in kubeadm kubelet kubectl crictl; do
        command -v "$tool" >/dev/null || { echo "common: the local box has no $tool" >&2; exit 1; }
    done
    echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" > /etc/default/kubelet
    systemctl enable kubelet
    exit 0
fi

apt-get update -q
apt-get install -y -q --no-install-recommends \
    apt-transport-https ca-certificates curl gpg containerd conntrack iptables socat

# containerd with the systemd cgroup driver (the kubelet's default with kubeadm)
mkdir -p /etc/containerd
containerd config default > /etc/containerd/config.toml
sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
systemctl restart containerd
systemctl enable containerd
# crictl (labkit reads a pod's container PID with it) talks to containerd
echo "runtime-endpoint: unix:///run/containerd/containerd.sock" > /etc/crictl.yaml

# kubeadm, kubelet, kubectl at exactly K8S_VERSION
install -d -m 0755 /etc/apt/keyrings
curl -fsSL "https://pkgs.k8s.io/core:/stable:/v${minor}/deb/Release.key" \
    | gpg --batch --yes --dearmor -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/v${minor}/deb/ /" \
    > /etc/apt/sources.list.d/kubernetes.list
apt-get update -q
version="${K8S_VERSION}-${K8S_PKG_REVISION}"
apt-get install -y -q --allow-change-held-packages \
    "kubelet=${version}" "kubeadm=${version}" "kubectl=${version}"
apt-mark hold kubelet kubeadm kubectl

# The Vagrant trap: the NAT interface (eth0, 10.0.2.15 on every VM) holds the
# default route, so the kubelet would advertise it.  Bind it to the private address.
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" > /etc/default/kubelet
systemctl enable kubelet
