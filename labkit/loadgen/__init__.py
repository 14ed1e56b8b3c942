"""The TFTP load generator: many concurrent RRQ transfers, each from a fresh client port.

Public API::

    spec = LoadSpec("10.0.0.1", 69, "file.bin", expected_size=5120, concurrency=64, duration=10)
    result = run_load(spec)                  # in this process / namespace
    result = run_load_on(client_host, spec)  # through Host.run (a netns, an SSH host)
    result.summary["ok"], result.timeseries, result.write("out/")

Modules: :mod:`.packet` (TFTP packets), :mod:`.spec` (LoadSpec), :mod:`.engine`
(the epoll loop), :mod:`.result` (LoadResult), :mod:`.runner` (workers, hosts),
:mod:`.loadgen_cli` (``labkit loadgen``).
"""

from labkit.loadgen.result import LoadResult
from labkit.loadgen.runner import probe_file, run_load, run_load_on
from labkit.loadgen.spec import LoadSpec

__all__ = ["LoadSpec", "LoadResult", "run_load", "run_load_on", "probe_file"]
