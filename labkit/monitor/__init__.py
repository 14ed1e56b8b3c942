"""The conntrack monitor: counts, counters and kernel drop logs per namespace, as tidy tables.

- :mod:`labkit.monitor.parse`: pure parsers (stat table, ``/dev/kmsg`` records, log lines).
- :mod:`labkit.monitor.sampler`: a thread per namespace, the ``/dev/kmsg`` follower.
- :mod:`labkit.monitor.agent`: the same, as one process streaming JSON lines (remote nodes).
- :mod:`labkit.monitor.monitor`: :class:`Monitor` (start/stop, ``samples``, ``events``, ``write``).

The chart of counts against the max with drops and log lines is :func:`labkit.charts.conntrack_chart`,
the one the notebooks draw.

Only the parsers are imported eagerly: the agent runs this package on nodes that
have the standard library alone, so pandas is loaded when :class:`Monitor` is used.
"""

from labkit.monitor.parse import (
    EXPECT_TABLE_FULL, KINDS, SUPPRESSED, TABLE_FULL, KernelEvent, classify_kernel_message,
    expect_count, parse_conntrack_S, parse_conntrack_stats, parse_dmesg_line, parse_kmsg_line,
    parse_syslog_line,
)

_LAZY = {
    "Monitor": "labkit.monitor.monitor",
    "read_samples": "labkit.monitor.monitor",
    "read_events": "labkit.monitor.monitor",
}

__all__ = [
    "EXPECT_TABLE_FULL", "KINDS", "SUPPRESSED", "TABLE_FULL", "KernelEvent", "Monitor",
    "classify_kernel_message", "expect_count", "parse_conntrack_S", "parse_conntrack_stats",
    "parse_dmesg_line", "parse_kmsg_line", "parse_syslog_line", "read_events", "read_samples",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labkit.monitor' has no attribute {name!r}")
