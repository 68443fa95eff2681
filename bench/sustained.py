"""Sustained throughput: a steady stream of four-view studies, RSS of the node over time.

A sender thread pushes studies with dcmtk storescu back to back, keeping at most ``ahead`` studies
received but not yet delivered (a steady queue, not an unbounded backlog); the main thread samples
the node's resident memory once a second. Studies/hour = delivered studies / (last delivery -
first send). Memory growth shows as a higher peak in the last quarter than in the second.

    .venv/bin/python -m bench.sustained --baseline main [--studies 30] [--rounds 1]
        [--format big-raw] [--out bench/results/FILE.md]

runs this tree and a baseline (a git revision checked out in a temporary worktree, as
bench/turnaround_baseline.py does) back to back, the order alternating per round, and prints
studies/h and the node's peak resident memory (VmHWM) of each with their ratios and the load
average: on a shared machine the figures are noisy, the ratio less so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Harness
from bench.proc import peak_rss_mib, rss_mib
from bench.studies import StudyFactory


@dataclass
class SustainedResult:
    label: str
    studies: int
    seconds: float
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (t s, RSS MiB)
    peak_mib: float = float("nan")  # the node's VmHWM at the end of the run

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
        work: Path | None = None, repo: Path | None = None,
        factory: StudyFactory | None = None) -> SustainedResult:
    """``repo``: run the node from another source tree (a baseline's worktree)."""
    factory = factory or StudyFactory(fmt, syntax, tag=f"sustained-{fmt}-{syntax}")
    factory.warm()
    with tempfile.TemporaryDirectory(prefix="mammo-bench-st-", dir=work) as tmp:
        root = Path(tmp)
        harness = Harness(root, repo=repo)
        peak = float("nan")
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
            peak = peak_rss_mib(harness.pid)
        finally:
            stop.set()
            thread.join(60)
            harness.close()
        if error:
            raise error[0]
    return SustainedResult(f"{fmt} {syntax}", done, elapsed, samples, peak)


def compare(fmt: str, syntax: str, studies: int, baseline: str, rounds: int,
            work: Path | None, ahead: int = 2) -> list[tuple[str, SustainedResult]]:
    """This tree and ``baseline`` back to back, ``rounds`` times, the order alternating."""
    from bench.turnaround_baseline import baseline_tree

    factory = StudyFactory(fmt, syntax, tag=f"sustained-{fmt}-{syntax}")
    factory.warm()
    out: list[tuple[str, SustainedResult]] = []
    with tempfile.TemporaryDirectory(prefix="mammo-bench-stb-", dir=work) as tmp, \
            baseline_tree(baseline, Path(tmp)) as base:
        for i in range(rounds):
            order: list[tuple[str, Path | None]] = [("baseline", base), ("this tree", None)]
            for name, repo in order if i % 2 == 0 else order[::-1]:
                out.append((name, run(fmt, syntax, studies, work=work, repo=repo,
                                      factory=factory, ahead=ahead)))
    return out


def table(results: list[tuple[str, SustainedResult]]) -> list[str]:
    rows = ["| run | tree | studies | seconds | studies/h | peak RSS (VmHWM) MiB | "
            "RSS per quarter MiB |", "|---|---|---|---|---|---|---|"]
    for i, (name, r) in enumerate(results, 1):
        rows.append(f"| {i} | {name} | {r.studies} | {r.seconds:.0f} | **{r.per_hour:.0f}** | "
                    f"{r.peak_mib:.0f} | {' → '.join(f'{p:.0f}' for p in r.quarter_peaks())} |")

    def mean(name: str, attr: str) -> float:
        values = [getattr(r, attr) for n, r in results if n == name]
        return sum(values) / len(values)

    rows += ["", f"- studies/h: this tree {mean('this tree', 'per_hour'):.0f}, baseline "
             f"{mean('baseline', 'per_hour'):.0f}, ratio **"
             f"{mean('this tree', 'per_hour') / mean('baseline', 'per_hour'):.2f}**",
             f"- node peak RSS: this tree {mean('this tree', 'peak_mib'):.0f} MiB, baseline "
             f"{mean('baseline', 'peak_mib'):.0f} MiB, ratio "
             f"{mean('this tree', 'peak_mib') / mean('baseline', 'peak_mib'):.2f}"]
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.report import publish
    from bench.turnaround_baseline import _rev

    ap = argparse.ArgumentParser(prog="python -m bench.sustained", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git revision to compare against")
    ap.add_argument("--studies", type=int, default=30, help="studies per run")
    ap.add_argument("--rounds", type=int, default=1, help="baseline + this tree pairs")
    ap.add_argument("--format", default="big-raw", help="FORMAT-SYNTAX (big/small/tiny, raw/j2k)")
    ap.add_argument("--ahead", type=int, default=2,
                    help="studies received but not yet delivered at most (2: latency-bound; "
                         "more keeps both cores busy)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    fmt, syntax = args.format.split("-")
    t0 = time.monotonic()
    load0 = os.getloadavg()
    results = compare(fmt, syntax, args.studies, args.baseline, args.rounds, args.workdir,
                      args.ahead)
    load1 = os.getloadavg()
    out = ["## Sustained throughput, this tree vs baseline (back to back, same run)", "",
           f"- this tree: {_rev('HEAD')}; baseline: {args.baseline} ({_rev(args.baseline)}); "
           f"{os.cpu_count()} CPUs; {args.format}, {args.studies} four-view studies per run, "
           f"at most {args.ahead} ahead",
           f"- load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
           f"after {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}",
           f"- command: `python -m bench.sustained "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
           *table(results), "", f"({time.monotonic() - t0:.0f} s)", ""]
    publish(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
