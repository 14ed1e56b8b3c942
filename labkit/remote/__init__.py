"""Machines reached over SSH (Paramiko), split the way fabric splits its ``Connection``.

- :mod:`labkit.remote.connection`: :class:`SSHConnection`, connect, reconnect,
  host keys, the SFTP session, close.
- :mod:`labkit.remote.executor`: :class:`SSHExecutor`, one per machine, shared by
  the host and its namespace views: commands with an optional prefix (``sudo``,
  ``ip netns exec NS``), timeouts, input, streams.
- :mod:`labkit.remote.channel`: reading a session channel; :class:`SSHStream`.
- :mod:`labkit.remote.transfer`: :class:`SSHTransfer`, SFTP and the sudo path
  (``cat``/``tee``) for files.
- :mod:`labkit.remote.sshhost`: :class:`SSHHost`, the :class:`~labkit.host.Host`
  composed from those, and :class:`SSHNetnsHost`, its view inside a namespace.
"""

from labkit.remote.channel import SSHStream
from labkit.remote.connection import SSHConnection
from labkit.remote.executor import SSHExecutor
from labkit.remote.sshhost import SSHHost, SSHNetnsHost
from labkit.remote.transfer import SSHTransfer

__all__ = ["SSHConnection", "SSHExecutor", "SSHHost", "SSHNetnsHost", "SSHStream", "SSHTransfer"]
