"""Incarnations read from /proc with real processes: dead only when this host's PID space says so for sure."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from services.delivery.liveness import Incarnation, certainly_dead, incarnation_of, this_incarnation

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="incarnations are read from /proc")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def here() -> Incarnation:
    me = this_incarnation()
    assert me is not None
    return me


def test_an_incarnation_is_written_and_read_back() -> None:
    me = here()
    assert me.pid == os.getpid() and Incarnation.parse(str(me)) == me
    assert Incarnation.parse(None) is None and Incarnation.parse("host-123") is None  # a `process` value is not one


def test_a_running_process_is_not_dead_and_a_killed_one_is(sleeper: subprocess.Popen[bytes]) -> None:
    them = incarnation_of(sleeper.pid)
    assert them is not None
    assert not certainly_dead(str(them), here())
    os.kill(sleeper.pid, signal.SIGKILL)
    sleeper.wait(10)
    assert certainly_dead(str(them), here())


def test_a_killed_process_not_yet_reaped_is_dead(sleeper: subprocess.Popen[bytes]) -> None:
    them = incarnation_of(sleeper.pid)
    assert them is not None
    os.kill(sleeper.pid, signal.SIGKILL)  # not waited for: a zombie until the fixture reaps it
    deadline = time.monotonic() + 10
    while not certainly_dead(str(them), here()):
        assert time.monotonic() < deadline, "a SIGKILLed zombie still reads as running"
        time.sleep(0.05)


def test_a_reused_pid_with_another_start_time_is_dead() -> None:
    me = here()
    assert certainly_dead(str(dataclasses.replace(me, start=me.start - 1)), me)
    assert not certainly_dead(str(me), me)


@pytest.mark.parametrize("elsewhere", [{"host": "other-host"}, {"boot": "another-boot"}, {"pidns": "4026599999"}])
def test_a_process_of_another_host_boot_or_container_is_never_known_dead(elsewhere: dict[str, str]) -> None:
    me = here()
    gone = dataclasses.replace(me, pid=2**22 + 17, **elsewhere)  # no such PID here: it would read as dead
    assert not certainly_dead(str(gone), me)
    assert certainly_dead(str(dataclasses.replace(me, pid=2**22 + 17)), me)  # the same, in this PID space: dead


def test_without_knowing_where_it_runs_nothing_is_known_dead() -> None:
    assert not certainly_dead(str(dataclasses.replace(here(), pid=2**22 + 17)), None)
    assert not certainly_dead(None, here())


def test_a_forked_child_is_its_own_incarnation() -> None:
    parent = here()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports what it would record, and exits at once
        os.write(write, str(this_incarnation()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    them = Incarnation.parse(os.read(read, 4096).decode())
    os.close(read)
    assert them is not None and them.pid == child != parent.pid
    assert certainly_dead(str(them), parent) and not certainly_dead(str(parent), parent)
