"""Sustained throughput: a steady stream of four-view studies, RSS of the node over time.

A sender thread pushes studies with dcmtk storescu back to back, keeping at most ``ahead`` studies
received but not yet delivered (a steady queue, not an unbounded backlog); the main thread samples
the node's resident memory once a second. Studies/hour = delivered studies / (last delivery -
first send). Memory growth shows as a higher peak in the last quarter than in the second.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Harness
from bench.proc import rss_mib
from bench.studies import StudyFactory


@dataclass
class SustainedResult:
    label: str
    studies: int
    seconds: float
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (t s, RSS MiB)

    @property
    def per_hour(self) -> float:
        return 3600.0 * self.studies / self.seconds if self.seconds > 0 else 0.0

    def quarter_peaks(self) -> list[float]:
        """Peak RSS in each quarter of the run (growth shows as a rising sequence)."""
        if not self.rss_mib:
            return []
        t_end = self.rss_mib[-1][0] or 1.0
        peaks = [0.0] * 4
        for t, r in self.rss_mib:
            q = min(3, int(4 * t / t_end))
            peaks[q] = max(peaks[q], r)
        return peaks


def run(fmt: str, syntax: str, studies: int, *, ahead: int = 2, max_seconds: float = 600,
        work: Path | None = None) -> SustainedResult:
    factory = StudyFactory(fmt, syntax, tag=f"sustained-{fmt}-{syntax}")
    factory.warm()
    with tempfile.TemporaryDirectory(prefix="mammo-bench-st-", dir=work) as tmp:
        root = Path(tmp)
        harness = Harness(root)
        sent = 0
        error: list[BaseException] = []
        stop = threading.Event()

        def sender() -> None:
            nonlocal sent
            try:
                for i in range(studies):
                    while not stop.is_set() and i - harness.delivered_count() >= ahead:
                        time.sleep(0.05)
                    if stop.is_set():
                        return
                    files = factory.write_study(i, root / "send")
                    harness.send(files)
                    for f in files:
                        f.unlink()
                    sent += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                error.append(exc)

        t0 = time.monotonic()
        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        samples: list[tuple[float, float]] = []
        done = 0
        try:
            while done < studies and time.monotonic() - t0 < max_seconds and not error:
                samples.append((time.monotonic() - t0, rss_mib(harness.pid)))
                done = harness.delivered_count()
                if harness.failed():
                    raise RuntimeError(f"the node failed: {harness.failed()[:2]}")
                harness.clear_destination()
                time.sleep(1.0)
            elapsed = time.monotonic() - t0
            samples.append((elapsed, rss_mib(harness.pid)))
        finally:
            stop.set()
            thread.join(60)
            harness.close()
        if error:
            raise error[0]
    return SustainedResult(f"{fmt} {syntax}", done, elapsed, samples)
