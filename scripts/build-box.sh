#!/usr/bin/env bash
# Build labkit's Debian 12 libvirt box with debootstrap (as root), or find it built.
#   scripts/build-box.sh [--cache DIR] [--mirror URL] [--force] [-v]
# Prints the .box path; the cache (default /var/cache/labkit/box) is outside the
# repository and keyed by the recipe, so a second run only prints the path.
# Add it to Vagrant with: vagrant box add --force --name labkit/debian12 PATH
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3   # the builder needs only the standard library
cd "$here"
exec "$py" -m labkit.vm.box "$@"
