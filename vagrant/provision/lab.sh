#!/usr/bin/env bash
# The one-VM lab on the public box (the local box, scripts/build-box.sh, holds all of
# this already): what the netns testbed needs, and a venv with labkit's Python
# dependencies at /opt/labkit/venv, the same place as in the local box.  labkit's
# own source is copied in by whoever drives the VM (labkit.vm.guest).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends iproute2 iptables conntrack kmod procps \
    tftpd-hpa tftp-hpa atftp python3 python3-venv sudo
# the lab starts its own in.tftpd inside namespaces
systemctl disable --now tftpd-hpa || true
if [ ! -x /opt/labkit/venv/bin/python ]; then
    python3 -m venv /opt/labkit/venv
fi
/opt/labkit/venv/bin/pip install -q "paramiko>=3.4" "pandas>=2" "seaborn>=0.13" "matplotlib>=3.6" \
    "python-vagrant>=1.0" "pyyaml>=6" "papermill>=2.5" "nbconvert>=7" "ipykernel>=6" \
    "prometheus_client>=0.16"
