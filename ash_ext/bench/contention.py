"""Whether other processes compete for the CPUs: measured, not guessed from the load average.

The 1-minute load average is a decaying average over the last minutes: right after a build
(``make bench`` compiles first) it is still high although nothing else runs any more. What
matters for the timings is the CPU time other processes take *while* the bench runs, on the
CPUs the bench may use. That is measured here from two readings of ``/proc/stat`` (the busy
time of those CPUs) less this process's own CPU time (``/proc/self/stat``, all its threads and
the children it waited for): ``other_cpus`` is the average number of CPUs the rest of the
machine kept busy over the window. Before timing, :func:`wait_for_quiet` waits (bounded) for
them to finish; the run records the measure over its own timing for the summary to report.

Every function takes its readings as arguments or through injectable callables, so that the
logic is tested without depending on the machine's actual load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any, Optional

#: Other processes using more CPUs than this on average (over a window) make the timings noisy:
#: a quarter of one CPU stalls multi-threaded ops noticeably on a 2-core machine; an idle machine's
#: kernel threads stay far below it.
BUSY_CPUS = 0.25

#: The default bound on :func:`wait_for_quiet` from the command line (seconds).
DEFAULT_WAIT_S = 20.0

SOURCE = "/proc/stat busy time of the CPUs this process may use, less this process's own CPU time (/proc/self/stat)"


@dataclass(frozen=True)
class CpuReading:
    """One reading of cumulative CPU times, in seconds: ``busy`` (user, nice, system, irq, softirq)
    and ``steal`` of ``cpus`` CPUs, ``own`` (this process and its waited-for children), at
    ``wall`` (a monotonic clock)."""

    wall: float
    busy: float
    steal: float
    own: float
    cpus: int


@dataclass(frozen=True)
class Contention:
    """CPU use over a window of ``window_s`` seconds on ``cpus`` CPUs, in CPUs on average:
    ``other_cpus`` by other processes, ``own_cpus`` by this one, ``steal_cpus`` taken by the
    hypervisor for other machines."""

    window_s: float
    cpus: int
    other_cpus: float
    own_cpus: float
    steal_cpus: float

    @property
    def busy(self) -> bool:
        """Whether other processes (or the hypervisor) used more than :data:`BUSY_CPUS`."""
        return self.other_cpus > BUSY_CPUS or self.steal_cpus > BUSY_CPUS

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Contention:
        """The :class:`Contention` of :meth:`as_dict`'s output (as stored in the results)."""
        return cls(**{name: data[name] for name in ("window_s", "cpus", "other_cpus", "own_cpus", "steal_cpus")})

    def as_dict(self) -> dict[str, Any]:
        """The fields, rounded, and where they come from (for the results' meta)."""
        return {**{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}, "source": SOURCE}


def _usable_cpus() -> Optional[set[int]]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return None


def parse_proc_stat(text: str, cpus: Optional[Collection[int]] = None) -> tuple[float, float, int]:
    """(busy ticks, steal ticks, CPUs counted) of the per-CPU lines of ``/proc/stat`` text, only
    those in ``cpus`` when given (idle and iowait are not busy; guest time is within user)."""
    busy = steal = 0
    count = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in rest.split()[:8]] + [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, st = values[:8]
        busy += user + nice + system + irq + softirq
        steal += st
        count += 1
    return float(busy), float(steal), count


def parse_self_stat(text: str) -> float:
    """Ticks of CPU time of a process from its ``/proc/<pid>/stat`` text: utime + stime of all its
    threads, plus cutime + cstime of the children it waited for (fields 14-17)."""
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) first
    return float(sum(int(v) for v in fields[11:15]))


def read_cpu(cpus: Optional[Collection[int]] = None) -> Optional[CpuReading]:
    """A :class:`CpuReading` now, of ``cpus`` (default: this process's affinity); ``None`` without ``/proc``."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/self/stat", encoding="utf-8", errors="replace") as f:
            own = f.read()
        tick = float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):
        return None
    busy, steal, count = parse_proc_stat(stat, cpus if cpus is not None else _usable_cpus())
    if count == 0:
        return None
    return CpuReading(time.monotonic(), busy / tick, steal / tick, parse_self_stat(own) / tick, count)


def contention(before: CpuReading, after: CpuReading) -> Contention:
    """The CPU use between two readings (see :class:`Contention`)."""
    window = max(after.wall - before.wall, 1e-9)
    own = max(0.0, after.own - before.own)
    other = max(0.0, after.busy - before.busy - own)
    return Contention(
        window_s=after.wall - before.wall,
        cpus=after.cpus,
        other_cpus=other / window,
        own_cpus=own / window,
        steal_cpus=max(0.0, after.steal - before.steal) / window,
    )


def describe(c: Contention) -> str:
    """``other processes used 1.02 of the 2 CPUs`` (and the steal time when there is any)."""
    text = f"other processes used {c.other_cpus:.2f} of the {c.cpus} CPU{'s' * (c.cpus != 1)}"
    if c.steal_cpus > BUSY_CPUS:
        text += f" and the hypervisor took {c.steal_cpus:.2f} for other machines (steal time)"
    return text


def wait_for_quiet(
    max_wait_s: float = DEFAULT_WAIT_S,
    *,
    window_s: float = 0.5,
    read: Callable[[], Optional[CpuReading]] = read_cpu,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> Optional[dict[str, Any]]:
    """Measure other processes' CPU use over ``window_s``; while it is :attr:`Contention.busy`, say
    so through ``log`` and keep measuring, for at most ``max_wait_s`` seconds in all.

    Returns ``{"waited_s", "quiet", "last": Contention.as_dict()}`` (``None`` when the CPU times
    cannot be read). Nothing is logged when the CPUs are quiet from the start; the wait ends at
    ``max_wait_s`` (give or take 0.1 s and the readings' own cost).
    """
    before = read()
    if before is None:
        return None
    start = before.wall
    deadline = start + max_wait_s
    announced = False
    while True:
        # full windows, the last one cut at the deadline (but not below 0.1 s, too short to measure)
        sleep(max(min(window_s, deadline - before.wall), min(window_s, 0.1)))
        after = read()
        if after is None:
            return None
        c = contention(before, after)
        waited = round(after.wall - start, 2)
        if not c.busy:
            if announced:
                log(f"bench: the CPUs are quiet after {waited:.0f} s ({describe(c)}); timing")
            return {"waited_s": waited, "quiet": True, "last": c.as_dict()}
        if after.wall >= deadline - 1e-3:
            log(
                f"bench: still busy after {waited:.0f} s ({describe(c)}); timing anyway, slower than the "
                "forecast (which is for idle CPUs) and noisier: the summary says how much they used meanwhile"
            )
            return {"waited_s": waited, "quiet": False, "last": c.as_dict()}
        if not announced:
            log(
                f"bench: {describe(c)} over the last {c.window_s:.1f} s (measured, not the load average); "
                f"waiting up to {max_wait_s:.0f} s for them to finish before timing (--wait-quiet 0: don't)"
            )
            announced = True
        before = after
