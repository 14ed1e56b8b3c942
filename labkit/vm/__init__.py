"""Real VMs on this machine: the local Vagrant box, the lab's own libvirt daemons, guests.

- :mod:`labkit.vm.box`: build a Debian 12 libvirt box with debootstrap (cached, no bootloader).
- :mod:`labkit.vm.libvirtd`: start and stop libvirtd/virtlogd by pid file inside a network
  namespace the lab makes, so that nothing of libvirt's touches the machine's own tables.
- :mod:`labkit.vm.guest`: a booted guest reached over SSH from the host (Paramiko), and
  labkit driven inside it.
"""
