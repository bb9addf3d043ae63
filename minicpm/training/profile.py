"""Where the memory of a run goes, as the operating system counts it: the resident set (VmRSS)
and its peak (VmHWM) of /proc/self/status, read at the edges of each phase.

Each phase records what it leaves resident (`kept`, the change of VmRSS) and the highest the
resident set reached while it ran (`peak`). The kernel's peak is reset at the start of each
phase (writing 5 to /proc/self/clear_refs), so a phase's peak is its own; the run's peak is the
highest of them, which every moment of the run belongs to. Where the reset is refused, a
phase's peak is the run's peak so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 2**20


def resident() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes; (0, 0) where /proc does not say."""
    found = {}
    try:
        for line in STATUS.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024  # kB
    except OSError:
        return 0, 0
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def _reset_peak() -> None:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass


class MemoryProfile:
    """Phases in the order they ran: name -> {"kept": bytes, "peak": bytes}; a phase entered
    again (several micro-batches) adds to its `kept` and keeps the higher `peak`."""

    def __init__(self) -> None:
        rss, hwm = resident()
        self.peak = hwm
        self.phases: dict[str, dict[str, int]] = {"runtime": {"kept": rss, "peak": hwm}}
        self._current: str | None = None
        self._start = 0

    def enter(self, name: str) -> None:
        """End the current phase (if any) and start `name`."""
        self.leave()
        rss, hwm = resident()
        self.peak = max(self.peak, hwm)
        _reset_peak()
        self._current, self._start = name, rss

    def leave(self) -> None:
        if self._current is None:
            return
        rss, hwm = resident()
        self.peak = max(self.peak, hwm)
        entry = self.phases.setdefault(self._current, {"kept": 0, "peak": 0})
        entry["kept"] += rss - self._start
        entry["peak"] = max(entry["peak"], hwm)
        self._current = None

    def run_peak(self) -> int:
        """The highest resident set of the run so far, in bytes."""
        self.peak = max(self.peak, resident()[1])
        return self.peak

    def add(self, name: str, kept: int) -> None:
        """A derived entry with no peak of its own (what the allocator holds on to)."""
        self.phases[name] = {"kept": kept, "peak": 0}

    def record(self) -> dict[str, Any]:
        """For log.jsonl: {"phases": {name: {"kept_mb", "peak_mb"}}, "peak_mb"}."""
        phases = {name: {"kept_mb": round(e["kept"] / MB, 1), "peak_mb": round(e["peak"] / MB, 1)}
                  for name, e in self.phases.items()}
        return {"phases": phases, "peak_mb": round(self.peak / MB, 1)}


def format_memory(record: dict[str, Any]) -> str:
    """A `record()` as a table."""
    lines = [f"{'memory by phase (VmRSS, VmHWM)':<34}{'kept MB':>9}{'peak MB':>10}"]
    for name, e in record["phases"].items():
        peak = f"{e['peak_mb']:>10,.0f}" if e["peak_mb"] else f"{'-':>10}"
        lines.append(f"  {name:<32}{e['kept_mb']:>9,.0f}{peak}")
    lines.append(f"  {'peak of the run':<32}{'':>9}{record['peak_mb']:>10,.0f}")
    return "\n".join(lines)
