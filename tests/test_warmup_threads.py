"""data/warmup.py:choose_threads: the flag, then the environment, then the idle CPUs."""

import os

import pytest

from megatron_mgrpo.data import warmup


@pytest.fixture
def machine(monkeypatch):
    """Four CPUs for this process; the load average is set per test."""
    monkeypatch.delenv(warmup.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)

    def set_load(load):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    return set_load


@pytest.mark.parametrize("load,threads", [(0.0, 4), (1.4, 3), (2.6, 1), (7.0, 1)])
def test_idle_cpus_minus_the_load_at_least_one(machine, load, threads):
    machine(load)
    n, why = warmup.choose_threads()
    assert n == threads
    assert why == f"4 CPUs available, load average {load:.2f}; --threads or " \
                  f"${warmup.THREADS_ENV} to override"


def test_the_flag_then_the_environment_override(machine, monkeypatch):
    machine(3.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert warmup.choose_threads() == (2, "$OMP_NUM_THREADS")
    monkeypatch.setenv(warmup.THREADS_ENV, "3")
    assert warmup.choose_threads() == (3, f"${warmup.THREADS_ENV}")
    assert warmup.choose_threads(5) == (5, "--threads")


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_environment_value_is_one_line(machine, monkeypatch, value):
    machine(0.0)
    monkeypatch.setenv(warmup.THREADS_ENV, value)
    with pytest.raises(ValueError, match=f"MGRPO_NUM_THREADS: got '{value}'; accepted: a "
                                         "positive integer"):
        warmup.choose_threads()
