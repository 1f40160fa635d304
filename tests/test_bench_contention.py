"""The bench's CPU-contention measure and its wait before timing, on injected readings (not the
machine's actual load), and how the summary words it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ash_ext.bench import contention as cn
from ash_ext.bench import family, report
from ash_ext.bench.machine import machine_info

PROC_STAT = """cpu  900 0 300 5000 20 0 10 40 0 0
cpu0 400 0 100 2500 10 0 5 20 0 0
cpu1 500 0 200 2500 10 0 5 20 0 0
cpu2 7 0 3 90 0 0 0 0 0 0
intr 12345
ctxt 678
"""


def test_proc_stat_busy_time_of_the_usable_cpus() -> None:
    assert cn.parse_proc_stat(PROC_STAT) == (400 + 100 + 5 + 500 + 200 + 5 + 10, 40, 3)
    assert cn.parse_proc_stat(PROC_STAT, cpus={0, 1}) == (1210, 40, 2)  # idle, iowait and the total line left out
    assert cn.parse_proc_stat(PROC_STAT, cpus={1}) == (705, 20, 1)


def test_self_stat_counts_threads_and_waited_children() -> None:
    # comm may hold spaces and parentheses; utime, stime, cutime, cstime are fields 14-17
    text = "4242 (python (x) y) R 1 2 3 4 5 6 7 8 9 10 111 222 33 44 20 0 3 0 99 100 200"
    assert cn.parse_self_stat(text) == 111 + 222 + 33 + 44


def _reading(wall: float, busy: float, own: float, steal: float = 0.0, cpus: int = 2) -> cn.CpuReading:
    return cn.CpuReading(wall=wall, busy=busy, steal=steal, own=own, cpus=cpus)


def test_other_processes_are_the_busy_time_less_our_own() -> None:
    # over 2 s the two CPUs were busy 3.0 s, 2.4 of them ours: others kept 0.3 CPUs busy
    c = cn.contention(_reading(10.0, 100.0, 5.0, 1.0), _reading(12.0, 103.0, 7.4, 1.2))
    assert c.window_s == pytest.approx(2.0)
    assert c.other_cpus == pytest.approx(0.3) and c.own_cpus == pytest.approx(1.2)
    assert c.steal_cpus == pytest.approx(0.1)
    assert c.busy and not cn.contention(_reading(0, 0, 0), _reading(1, 1.1, 1.0)).busy
    assert cn.Contention.from_dict(c.as_dict()) == cn.Contention(2.0, 2, 0.3, 1.2, 0.1)
    assert "other processes used 0.30 of the 2 CPUs" == cn.describe(c)
    # a process that only ran before the window (a finished build) does not count at all
    assert cn.contention(_reading(0, 500.0, 0), _reading(1, 500.0, 0)).other_cpus == 0


class FakeMachine:
    """A clock and CPU readings: other processes busy at ``other(t)`` CPUs, this process idle."""

    def __init__(self, other: Callable[[float], float]) -> None:
        self.other = other
        self.now = 100.0
        self.busy = 0.0
        self.slept: list[float] = []
        self.log: list[str] = []

    def read(self) -> cn.CpuReading:
        return _reading(self.now, self.busy, own=1.0)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.busy += self.other(self.now) * seconds
        self.now += seconds

    def wait(self, max_wait_s: float = 20.0) -> dict | None:
        return cn.wait_for_quiet(max_wait_s, window_s=0.5, read=self.read, sleep=self.sleep, log=self.log.append)


def test_quiet_cpus_mean_one_short_window_and_no_message() -> None:
    machine = FakeMachine(lambda t: 0.05)
    result = machine.wait()
    assert result is not None and result["quiet"] and result["waited_s"] == 0.5
    assert machine.slept == [0.5] and machine.log == []


def test_it_waits_while_others_are_busy_and_says_so() -> None:
    machine = FakeMachine(lambda t: 1.0 if t < 101.5 else 0.0)  # a build that ends 1.5 s in
    result = machine.wait()
    assert result is not None and result["quiet"] and result["waited_s"] == 2.0
    assert len(machine.log) == 2
    assert "other processes used 1.00 of the 2 CPUs" in machine.log[0] and "waiting up to 20 s" in machine.log[0]
    assert "not the load average" in machine.log[0]
    assert machine.log[1].startswith("bench: the CPUs are quiet after 2 s")


def test_the_wait_is_bounded() -> None:
    machine = FakeMachine(lambda t: 2.0)
    result = machine.wait(max_wait_s=5.0)
    assert result is not None and not result["quiet"]
    assert sum(machine.slept) <= 5.0 and result["waited_s"] == pytest.approx(5.0)
    assert "still busy after 5 s" in machine.log[-1] and "timing anyway" in machine.log[-1]
    assert result["last"]["other_cpus"] == pytest.approx(2.0)


def test_no_proc_means_no_wait() -> None:
    assert cn.wait_for_quiet(20.0, read=lambda: None, sleep=pytest.fail) is None


def _meta(**extra: object) -> dict:
    return {"machine": machine_info("cpu") | {"device": "cpu", "cpus_usable": 2}, "wall_s": 1.0, **extra}


def _lines(meta: dict) -> list[str]:
    return report.summary_lines({"meta": meta, "results": []}) + family.summary_lines({"meta": meta, "results": []})


def test_a_high_load_average_from_a_finished_build_is_not_blamed_on_anyone() -> None:
    quiet = cn.Contention(60.0, 2, 0.02, 1.9, 0.0).as_dict()
    lines = _lines(_meta(load_average_start=[3.9, 2.0, 1.0], load_average_end=[2.5, 2.0, 1.0], cpu_contention=quiet))
    assert not [line for line in lines if "load average" in line or "other processes" in line], lines


def test_measured_contention_is_reported_with_its_cause() -> None:
    busy = cn.Contention(60.0, 2, 1.3, 1.0, 0.0).as_dict()
    lines = _lines(_meta(load_average_start=[0.1, 0.1, 0.1], cpu_contention=busy))
    hits = [line for line in lines if "other processes used 1.30 of the 2 CPUs on average" in line]
    assert len(hits) == 2 and "while the cases were timed" in hits[0] and "noisy" in hits[0]
    waited = _lines(_meta(cpu_contention=busy, quiet_wait={"waited_s": 20.0, "quiet": False, "last": busy}))
    assert any("waited 20 s before timing" in line and "had not" in line for line in waited)


def test_without_proc_the_load_average_is_reported_as_what_it_is() -> None:
    meta = _meta(load_average_start=[3.9, 2.0, 1.0], cpu_contention=None)
    lines = report.summary_lines({"meta": meta, "results": []})
    (line,) = [line for line in lines if "load average" in line]
    assert "counts processes that have ended" in line and "could not be measured" in line
