"""The front's weight state: when the server may report healthy and serve."""

from __future__ import annotations

import pytest

from workers.server.state import INCONSISTENT, READY, WAIT_TIMED_OUT, WAITING, WeightState


@pytest.mark.parametrize(
    "real, wait, now, status",
    [
        (True, False, 0, READY),
        (False, False, 1e9, WAITING),  # dummy weights are never servable by themselves
        (True, True, 5, WAITING),  # under the wait flag even real weights wait for an update
        (False, True, 5, WAITING),
        (False, True, 10, WAIT_TIMED_OUT),
        (True, True, 11, WAIT_TIMED_OUT),
    ],
)
def test_startup_status(real, wait, now, status):
    state = WeightState.at_startup(
        version="v0", real_weights=real, wait=wait, wait_timeout=10, now=0
    )
    assert state.status(now) == status


def test_update_commits_and_failure_fails_closed():
    state = WeightState.at_startup(
        version="v0", real_weights=False, wait=True, wait_timeout=1, now=0
    )
    assert state.status(5) == WAIT_TIMED_OUT
    state.commit("v1")
    assert state.status(5) == READY and state.version == "v1"
    state.commit(None)
    assert state.version == "v1"
    state.mark_inconsistent("bucket 3 failed")
    assert state.status(5) == INCONSISTENT and state.problem == "bucket 3 failed"
    state.commit("v2")
    assert state.status(5) == READY and state.problem is None
