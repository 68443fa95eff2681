"""Study turnaround: last instance stored -> results acknowledged by the destination.

Four-view studies are sent one at a time by dcmtk storescu to the node (a real process, the
shipped model, ``complete_on_four_views``, a one-hour quiet timer that never fires); storescp is
the PACS. Each study's turnaround and its stages come from the node's database: completion +
queue wait, decode, ROI finding, classifier, Grad-CAM, SR/SC build + durable write, and send
(the deliverer's C-STORE of the SR and the SCs until the destination's last 0x0000).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.harness import STAGES, Harness, StudyTiming
from bench.proc import peak_rss_mib
from bench.studies import StudyFactory


@dataclass
class TurnaroundResult:
    label: str
    timings: list[StudyTiming]
    node_peak_rss_mib: float

    def pct(self, q: float, stage: str | None = None) -> float:
        values = sorted(t.turnaround_s if stage is None else t.stages_s[stage]
                        for t in self.timings)
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]

    @property
    def rois(self) -> float:
        return statistics.mean(t.rois for t in self.timings)


def run(fmt: str, syntax: str, studies: int, *, warmup: int = 1, work: Path | None = None,
        sc_max_side: int | None = None, precision: str = "auto") -> TurnaroundResult:
    factory = StudyFactory(fmt, syntax, tag=f"turnaround-{fmt}-{syntax}")
    factory.warm()
    with tempfile.TemporaryDirectory(prefix="mammo-bench-ta-", dir=work) as tmp:
        root = Path(tmp)
        harness = Harness(root, sc_max_side=sc_max_side, precision=precision)
        timings: list[StudyTiming] = []
        try:
            for i in range(warmup + studies):
                files = factory.write_study(i, root / "send")
                study_uid = factory.study_uid(i)
                harness.send(files)
                for f in files:
                    f.unlink()
                harness.wait_delivered(study_uid)
                if i >= warmup:
                    timings.append(harness.timing(study_uid))
                harness.clear_destination()
            rss = peak_rss_mib(harness.pid)
        finally:
            harness.close()
    return TurnaroundResult(f"{fmt} {syntax}", timings, rss)


def stage_table(results: list[TurnaroundResult]) -> list[str]:
    """Markdown rows: p50/p95 turnaround and the p50 of every stage."""
    head = ("| study | n | ROIs/study | p50 s | p95 s | "
            + " | ".join(f"{s} p50" for s in STAGES) + " | node peak RSS MiB |")
    rows = [head, "|" + "---|" * (6 + len(STAGES))]
    for r in results:
        rows.append(
            f"| {r.label} | {len(r.timings)} | {r.rois:.0f} | {r.pct(50):.2f} | "
            f"{r.pct(95):.2f} | " + " | ".join(f"{r.pct(50, s):.2f}" for s in STAGES)
            + f" | {r.node_peak_rss_mib:.0f} |"
        )
    return rows
