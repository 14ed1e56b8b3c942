#!/usr/bin/env bash
# The client VM: labkit itself (the load generator runs here as
# `python3 -m labkit loadgen`), installed from the uploaded source.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-pip python3-venv tftp-hpa
# This VM exists for the lab, so labkit goes into the system Python, where
# `python3 -m labkit` finds it for every user.
python3 -m pip install -q --break-system-packages --root-user-action=ignore /tmp/labkit-src
python3 -m labkit --version
