"""The CPU-sharing thread policy: the arithmetic, the explicit settings that turn it off, and its reaction to
readings of other processes' CPU use (fed in, so the test does not depend on this machine's load)."""

import pytest
import torch

from fewstep import threads
from fewstep.errors import ConfigError


@pytest.mark.parametrize(("cores", "others", "expected"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 3.5, 1), (8, 2.2, 6), (8, 0.0, 8), (1, 0.0, 1),
])
def test_threads_for_leaves_the_cores_others_use(cores, others, expected):
    assert threads.threads_for(cores, others) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "2,1"])
def test_bad_fewstep_threads_is_refused(monkeypatch, value):
    monkeypatch.setenv("FEWSTEP_THREADS", value)
    with pytest.raises(ConfigError, match="FEWSTEP_THREADS"):
        threads.fixed_threads()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fed_share(monkeypatch, readings: list[tuple[float, int, int, int]]) -> threads._Share:
    """A started policy on 2 cores whose readings of /proc come from ``readings``."""
    monkeypatch.delenv("FEWSTEP_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    share = threads._Share()
    monkeypatch.setattr(share, "read", lambda: readings.pop(0))
    share.start()
    share.cpus = {"cpu0", "cpu1"}
    return share


def test_other_load_lowers_and_raises_the_threads(monkeypatch, restore_threads):
    # (time, busy ticks of both cores, all ticks of both cores, own ticks): 100 ticks per core per second
    share = fed_share(monkeypatch, [
        (0.0, 0, 0, 0),
        (1.0, 200, 200, 100),  # both cores busy, this process used one: another process uses the other
        (2.0, 400, 400, 200),  # the same: one core each
        (3.0, 500, 600, 300),  # the other process ended: 100 busy ticks, all of them this process's
    ])
    assert share.enabled and share.ceiling == 2
    share.update()
    assert torch.get_num_threads() == 1
    share.update()
    assert torch.get_num_threads() == 1
    share.update()
    assert torch.get_num_threads() == 2


def test_explicit_count_turns_the_policy_off(monkeypatch, restore_threads):
    share = fed_share(monkeypatch, [(0.0, 0, 0, 0), (1.0, 200, 200, 100)])
    torch.set_num_threads(1)  # the program chose for itself
    share.update()
    assert not share.enabled
    torch.set_num_threads(2)
    monkeypatch.setenv("FEWSTEP_THREADS", "1")
    share = threads._Share()
    share.start()
    assert not share.enabled and torch.get_num_threads() == 1


def test_a_restart_keeps_pytorchs_own_count_as_the_ceiling(monkeypatch, restore_threads):
    share = fed_share(monkeypatch, [(0.0, 0, 0, 0), (1.0, 200, 200, 100), (1.5, 200, 200, 100)])
    share.update()
    assert torch.get_num_threads() == 1
    share.start()  # a second command in the same process, while the load lowered the count
    assert share.enabled and share.ceiling == 2
