#!/usr/bin/env bash
# Set up what labkit needs on a Debian-like machine, idempotently:
#   scripts/setup.sh lab    Debian packages for the netns testbed + .venv with labkit
#   scripts/setup.sh test   the same, plus what the tests need (sshd, vagrant, shellcheck,
#                           chromium and its driver for the browser test)
#   scripts/setup.sh vm     the same, plus what the vm tier needs (QEMU, libvirt without
#                           its default network, debootstrap; see labkit/vm/)
# Quick when all is there: it installs only what is missing.
set -euo pipefail

mode=${1:-lab}
here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"

# command -> Debian package
lab_pkgs="ip:iproute2 iptables:iptables iptables-restore:iptables conntrack:conntrack
in.tftpd:tftpd-hpa tftp:tftp-hpa atftp:atftp modprobe:kmod pgrep:procps nft:nftables"
test_pkgs="sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client
vagrant:vagrant shellcheck:shellcheck sudo:sudo chromium:chromium chromedriver:chromium-driver
prometheus:prometheus"
# packages with no command of their own (checked with dpkg): the Vagrant libvirt
# provider, so that `vagrant validate` also checks the libvirt settings
test_debs="vagrant-libvirt"
# the vm tier: QEMU (TCG, no KVM needed), the libvirt daemon and its QEMU driver but not
# libvirt-daemon-system (whose default NAT network the lab never starts), debootstrap for the box
vm_pkgs="qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils debootstrap:debootstrap
libvirtd:libvirt-daemon virsh:libvirt-clients dnsmasq:dnsmasq-base mkfs.ext4:e2fsprogs
unshare:util-linux"
vm_debs="libvirt-daemon-driver-qemu"

case "$mode" in
    lab) want="$lab_pkgs" ;;
    test) want="$lab_pkgs $test_pkgs" ;;
    vm) want="$lab_pkgs $test_pkgs $vm_pkgs"; test_debs="$test_debs $vm_debs" ;;
    *) echo "setup: unknown mode '$mode' (lab, test or vm)" >&2; exit 2 ;;
esac

missing=""
for pair in $want; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1; then
        case " $missing " in *" $pkg "*) ;; *) missing="$missing $pkg" ;; esac
    fi
done
if [ "$mode" != lab ]; then
    for pkg in $test_debs; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
    done
fi
# in.tftpd must be tftpd-hpa's (the pods run it with --foreground, --secure, --address);
# atftpd ships an in.tftpd too, which refuses those options
tftpd_is_hpa() {
    local path
    path=$(PATH="$PATH:/usr/sbin:/sbin" command -v in.tftpd 2>/dev/null) || return 1
    "$path" -V 2>&1 | head -n1 | grep -q '^tftp-hpa'
}
if PATH="$PATH:/usr/sbin:/sbin" command -v in.tftpd >/dev/null 2>&1 && ! tftpd_is_hpa \
        && ! dpkg-query -W -f='${Status}' tftpd-hpa 2>/dev/null | grep -q "ok installed"; then
    case " $missing " in *" tftpd-hpa "*) ;; *) missing="$missing tftpd-hpa" ;; esac
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing="$missing python3-venv"
fi

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages:$missing" >&2
        echo "setup: run as root, or: sudo apt-get install$missing" >&2
        exit 1
    fi
    echo "setup: installing Debian packages:$missing"
    # Packages such as tftpd-hpa and openssh-server start a system service when
    # installed; the lab runs its own servers inside its namespaces, so keep the
    # machine's service manager from starting them (only if nothing else does).
    policy=/usr/sbin/policy-rc.d
    made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; made_policy=1
        trap '[ -n "$made_policy" ] && rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

if ! tftpd_is_hpa; then
    path=$(PATH="$PATH:/usr/sbin:/sbin" command -v in.tftpd || echo "no in.tftpd")
    echo "setup: $path is not tftpd-hpa's in.tftpd ($("$path" -V 2>&1 | head -n1)); labkit needs it:" >&2
    echo "setup: apt-get install --reinstall tftpd-hpa, and remove the other one (atftpd's:" \
         "apt-get remove atftpd) or put /usr/sbin first on the PATH" >&2
    exit 1
fi

# libvirt-daemon-system would make the user QEMU runs as; the vm tier does it alone
if [ "$mode" = vm ] && ! getent passwd libvirt-qemu >/dev/null; then
    echo "setup: adding the system user libvirt-qemu (QEMU under libvirtd runs as it)"
    getent group libvirt-qemu >/dev/null || addgroup --quiet --system libvirt-qemu
    adduser --quiet --system --ingroup libvirt-qemu --disabled-login --disabled-password \
        --home /var/lib/libvirt --no-create-home --gecos "Libvirt Qemu" libvirt-qemu 2>/dev/null
fi

stamp="$venv/.labkit-installed"
digest=$(cat "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    python3 -m venv "$venv"
fi
pymode=$mode
[ "$mode" = vm ] && pymode=test   # the vm tier needs the same Python packages as the tests
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest-$pymode" ] && [ "$(cat "$stamp" 2>/dev/null)" != "$digest-test" ]; then
    echo "setup: installing labkit and its Python dependencies into $venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    extra=""
    [ "$mode" != lab ] && extra="[test]"
    "$venv/bin/python" -m pip install -q -e "$here$extra"
    echo "$digest-$pymode" > "$stamp"
fi

# The Jupyter kernel the notebooks name ("labkit"): this venv's Python, so that
# papermill and JupyterLab started from the venv run the notebooks with labkit importable.
if [ ! -f "$venv/share/jupyter/kernels/labkit/kernel.json" ]; then
    echo "setup: registering the Jupyter kernel 'labkit' for $venv"
    "$venv/bin/python" -m ipykernel install --sys-prefix --name labkit --display-name "Python (labkit)" >/dev/null
fi
