#!/usr/bin/env bash
# The client VM: labkit itself (the load generator runs here as
# `python3 -m labkit loadgen`), installed from the uploaded source.
# LOCAL_BOX=1 with labkit's own box: its venv at /opt/labkit/venv holds labkit's Python
# dependencies; the uploaded source goes beside it and `python3` is that venv's.
set -euo pipefail

# labkit's source, uploaded as one archive by the Vagrantfile
rm -rf /tmp/labkit-src
install -d -m 0755 /tmp/labkit-src
tar -xzf /tmp/labkit-src.tar.gz -C /tmp/labkit-src --no-same-owner

if [ "${LOCAL_BOX:-}" = 1 ]; then
    rm -rf /opt/labkit/src
    cp -a /tmp/labkit-src /opt/labkit/src
    site=$(/opt/labkit/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo /opt/labkit/src > "$site/labkit-src.pth"
    # a wrapper, not a symlink: Python finds its venv (pyvenv.cfg) beside the path it was started as
    printf '#!/bin/sh\nexec /opt/labkit/venv/bin/python3 "$@"\n' > /usr/local/bin/python3
    chmod 755 /usr/local/bin/python3
    python3 -m labkit --version
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-pip python3-venv tftp-hpa
# This VM exists for the lab, so labkit goes into the system Python, where
# `python3 -m labkit` finds it for every user.
python3 -m pip install -q --break-system-packages --root-user-action=ignore /tmp/labkit-src
python3 -m labkit --version
