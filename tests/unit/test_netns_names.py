"""Names of the netns testbed's resources: lk prefix, the run id, and at most 15 characters."""

import string

import pytest

from labkit.exceptions import TestbedError
from labkit.testbed.netns import link_name, new_run_id


def test_run_ids_are_short_and_distinct():
    ids = {new_run_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 5 and set(i) <= set(string.ascii_lowercase + string.digits) for i in ids)


def test_every_interface_name_carries_prefix_and_run_and_fits_the_kernel():
    rid = new_run_id()
    for what in ("n0", "c0", "br", "v1", "e1", "v9999999"):
        name = link_name(rid, what)
        assert name.startswith(f"lk{rid}") and len(name) <= 15
    with pytest.raises(TestbedError, match="15 characters"):
        link_name(rid, "v123456789")
