"""Study turnaround of this tree against a baseline, measured in one run, alternating.

    .venv/bin/python -m bench.turnaround_baseline [--baseline integrate] [--studies 8]
        [--formats big-raw,big-j2k] [--gaps 0,2] [--out bench/results/FILE.md]

Two nodes run side by side (each a real process with the shipped model, storescp as the PACS,
the four-view rule completing studies): this tree, and the baseline, either a git revision
(checked out in a temporary ``git worktree``: today's code) or ``off`` (this tree with
``analysis.preanalysis_workers = 0``: the same code without per-instance pre-analysis). Study
``i`` goes to both, one after the other, in an order that alternates with ``i``, so load on the
machine hits both alike. Turnaround = last instance stored -> the PACS acknowledged every
result (each image of a study sent in its own association ``gap`` seconds after the previous one,
as a modality sends views as they are acquired, or all back to back: ``--gaps``); stages as in
bench/turnaround.py (decode and ROI finding are what remained at study
completion: with pre-analysis they ran while the study arrived). The load average before and
after is printed: on a shared machine the figures are noisy, the ratio much less.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.harness import STAGES, Harness, StudyTiming
from bench.proc import peak_rss_mib
from bench.report import publish
from bench.studies import StudyFactory
from bench.turnaround import TurnaroundResult

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def baseline_tree(rev: str, work: Path):  # type: ignore[no-untyped-def]
    """A detached ``git worktree`` of ``rev``, removed afterwards."""
    path = work / f"baseline-{rev.replace('/', '_')}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                       capture_output=True)


def _rev(rev: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev],
                         capture_output=True, text=True)
    return out.stdout.strip() or rev


def _send(h: Harness, files: list[Path], gap: float) -> None:
    """The study in one association (gap 0), or one association per image, ``gap`` seconds
    apart (a modality sending each view as it is acquired)."""
    if gap <= 0:
        h.send(files)
        return
    for n, f in enumerate(files):
        if n:
            time.sleep(gap)
        h.send([f])


def compare(fmt: str, syntax: str, studies: int, baseline: str, work: Path | None,
            warmup: int = 1, gap: float = 0.0) -> tuple[TurnaroundResult, TurnaroundResult]:
    factory = StudyFactory(fmt, syntax, tag=f"tab-{fmt}-{syntax}")
    factory.warm()
    with tempfile.TemporaryDirectory(prefix="mammo-bench-tab-", dir=work) as tmp:
        root = Path(tmp)
        with (baseline_tree(baseline, root) if baseline != "off" else _none()) as base_repo:
            base = Harness(root / "base", repo=base_repo,
                           analysis_extra={"preanalysis_workers": 0} if baseline == "off"
                           else None)
            try:
                new = Harness(root / "new")
            except Exception:
                base.close()
                raise
            timings: dict[str, list[StudyTiming]] = {"base": [], "new": []}
            try:
                for i in range(warmup + studies):
                    files = factory.write_study(i, root / "send")
                    study_uid = factory.study_uid(i)
                    order = [("base", base), ("new", new)]
                    if i % 2:
                        order.reverse()
                    for name, h in order:
                        _send(h, files, gap)
                        h.wait_delivered(study_uid)
                        if i >= warmup:
                            timings[name].append(h.timing(study_uid))
                        h.clear_destination()
                    for f in files:
                        f.unlink()
                rss = {"base": peak_rss_mib(base.pid), "new": peak_rss_mib(new.pid)}
            finally:
                base.close()
                new.close()
    label = f"{fmt} {syntax}" + (f", images {gap:g} s apart" if gap > 0 else
                                 ", back to back")
    return (TurnaroundResult(f"{label}, baseline", timings["base"], rss["base"]),
            TurnaroundResult(f"{label}, this tree", timings["new"], rss["new"]))


@contextmanager
def _none():  # type: ignore[no-untyped-def]
    yield None


def table(pairs: list[tuple[TurnaroundResult, TurnaroundResult]]) -> list[str]:
    head = ("| study | n | ROIs/study | p50 s | p95 s | "
            + " | ".join(f"{s} p50" for s in STAGES) + " | node peak RSS MiB | p50 ratio |")
    rows = [head, "|" + "---|" * (7 + len(STAGES))]
    for base, new in pairs:
        for r in (base, new):
            ratio = "1.00" if r is base else f"**{new.pct(50) / base.pct(50):.2f}**"
            rows.append(
                f"| {r.label} | {len(r.timings)} | {r.rois:.0f} | {r.pct(50):.2f} | "
                f"{r.pct(95):.2f} | " + " | ".join(f"{r.pct(50, s):.2f}" for s in STAGES)
                + f" | {r.node_peak_rss_mib:.0f} | {ratio} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.turnaround_baseline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="integrate",
                    help="git revision to compare against, or 'off' (pre-analysis disabled)")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--formats", default="big-raw,big-j2k",
                    help="comma-separated FORMAT-SYNTAX (big/small/tiny, raw/j2k)")
    ap.add_argument("--gaps", default="0,2",
                    help="comma-separated seconds between the images of a study (0: the whole "
                         "study in one association, back to back)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    pairs = []
    for spec in args.formats.split(","):
        fmt, syntax = spec.strip().split("-")
        for gap in (float(g) for g in args.gaps.split(",")):
            pairs.append(compare(fmt, syntax, args.studies, args.baseline, args.workdir,
                                 gap=gap))
    load1 = os.getloadavg()
    base = "pre-analysis off (this tree)" if args.baseline == "off" else \
        f"{args.baseline} ({_rev(args.baseline)})"
    out = ["## Study turnaround, this tree vs baseline (alternating, same run)", "",
           f"- this tree: {_rev('HEAD')}; baseline: {base}; {os.cpu_count()} CPUs",
           f"- load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
           f"after {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}",
           f"- command: `python -m bench.turnaround_baseline "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
           *table(pairs), "", f"({time.monotonic() - t0:.0f} s)", ""]
    publish(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
