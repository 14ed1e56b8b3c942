"""The one exception tree of labkit.

Every error labkit raises on purpose is a :class:`LabkitError`; callers catch the
precise child they can handle and let the rest reach the CLI, which prints the
message and exits non-zero.  Messages say what was wrong and where (the host,
the file, the field) and, where there is one, what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from labkit.host import Result


class LabkitError(Exception):
    """Base of every error labkit raises on purpose."""


class CommandFailed(LabkitError):
    """A command ran and exited non-zero.

    Attributes:
        result: the :class:`labkit.host.Result` of the command.
    """

    def __init__(self, result: "Result", message: str | None = None):
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        detail = "\n  ".join(tail)
        super().__init__(
            message
            or f"{result.host}: command failed with exit code {result.exit_code}: "
            f"{result.command}" + (f"\n  {detail}" if detail else "")
        )


class CommandTimedOut(LabkitError):
    """A command did not finish before its deadline and was ended.

    Attributes:
        command: the command as shown to a user.
        host: name of the host it ran on.
        timeout: the deadline in seconds.
        stdout, stderr: what it printed before it was ended.
    """

    def __init__(self, command: str, host: str, timeout: float, stdout: str = "", stderr: str = ""):
        self.command = command
        self.host = host
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{host}: command timed out after {timeout:g} s and was ended: {command}")


class SysctlError(LabkitError):
    """A sysctl name is invalid, does not exist, or the kernel refused a value.

    Attributes:
        name: the sysctl as given.
        host: the host (or namespace) it was read or written on.
        reason: the kernel's message or the validation failure.
    """

    def __init__(self, name: str, host: str, reason: str, value: Any = None):
        self.name = name
        self.host = host
        self.reason = reason
        self.value = value
        what = f"writing {name}={value}" if value is not None else f"sysctl {name}"
        super().__init__(f"{host}: {what}: {reason}")


class SSHError(LabkitError):
    """Connecting to, authenticating with, or talking to an SSH server failed."""


class HostKeyError(SSHError):
    """An SSH server's host key is unknown or differs from the pinned one."""


class TestbedError(LabkitError):
    """A testbed could not be built, reconfigured, inspected or torn down."""

    __test__ = False  # not a pytest test class, whatever its name says


class GlobalSysctlsHeld(TestbedError):
    """Another lab run on this machine holds the global conntrack sysctls (one owner at a time)."""


class SavedSysctlsUnreadable(TestbedError):
    """The saved global sysctls (``global-sysctls.json`` and its copy) cannot be read.

    Attributes:
        path: the state file.
    """

    def __init__(self, path, reason: str):
        self.path = path
        super().__init__(f"{path}: the saved global sysctls are unreadable ({reason}); "
                         "`labkit clean` restores the kernel's defaults instead")


class StateCorrupt(TestbedError):
    """A run's state file or ledger is damaged (not the JSON labkit wrote).

    Attributes:
        path: the damaged file.
    """

    def __init__(self, path, reason: str, advice: str = "run `labkit clean`, which removes what "
                 "the run's readable records name and reports anything left"):
        self.path = path
        super().__init__(f"{path} is damaged ({reason}); {advice}")


class LoadUnderWay(TestbedError):
    """A load is running on the testbed: taking it down or reconfiguring it now is refused."""


class PodRejected(TestbedError):
    """A pod was refused admission, as the kubelet would refuse it.

    Attributes:
        pod: the pod's name.
        reason: the kubelet's reason, e.g. ``SysctlForbidden``.
    """

    def __init__(self, pod: str, reason: str, message: str):
        self.pod = pod
        self.reason = reason
        super().__init__(f"pod {pod}: {reason}: {message}")


class VMError(LabkitError):
    """A VM tool failed: the box build, the lab's libvirt daemons, or a guest."""


class ScenarioError(LabkitError):
    """A scenario, profile, manifest or inventory file is invalid.

    The message names the file, the field and what is allowed.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        self.path = path
        self.field = field
        where = ": ".join(p for p in (path, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


class SizingError(LabkitError):
    """A value given to the conntrack sizing model is out of range, or nothing fits.

    Attributes:
        field: the input it is about (``rate``, ``node_udp_timeout``...), or None.
    """

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class LoadgenError(LabkitError):
    """The load generator was misused or could not run."""


class MalformedPacket(LoadgenError):
    """Bytes that are not a well-formed TFTP packet.

    Attributes:
        reason: what was wrong (too short, unknown opcode, missing NUL...).
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"malformed TFTP packet: {reason}")


class MonitorError(LabkitError):
    """The conntrack monitor could not sample or follow the kernel log."""


class ReplayError(LabkitError):
    """A batch replay could not run or record its results."""
