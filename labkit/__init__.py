"""labkit: replay Linux conntrack throttling a TFTP NodePort service, step by step.

The package brings up a testbed (network namespaces, Vagrant VMs, or an existing
cluster over SSH), applies each iteration's sysctls, drives a TFTP load, samples
conntrack, and writes tidy data for the notebooks.
"""

from labkit.exceptions import LabkitError
from labkit.host import Host, LocalHost, NetnsHost, Result

__version__ = "0.1.0"
__all__ = ["Host", "LabkitError", "LocalHost", "NetnsHost", "Result", "__version__"]
