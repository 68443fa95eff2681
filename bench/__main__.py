"""The benchmark suite: one command, one table.

    .venv/bin/python -m bench [--tiny] [--out FILE.md] [--device auto] [--precision auto]
                              [--only ingest,turnaround,sustained,classifier]

Sections: ingest (node vs dcmtk storescp, same storescu, MB/s, images/s, peak RSS), study
turnaround (p50/p95 and stages), sustained studies/hour with RSS over time, classifier ROIs/s.
``--tiny`` runs every section on small images and few repeats (CI keeps it working; its figures
mean nothing). The full run takes ~15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("ingest", "turnaround", "sustained", "classifier")

FULL = {
    "ingest": [("big", "raw", 4, 3), ("small", "raw", 4, 3), ("big", "j2k", 1, 3)],
    "turnaround": [("big", "raw", 20), ("small", "raw", 20), ("big", "j2k", 10)],
    "sustained": ("big", "raw", 60, 420.0),
    "classifier": (["efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
                    "efficientnet_b3", "efficientnet_b4"], [1, 16], 2.0),
}
TINY = {
    "ingest": [("tiny", "raw", 1, 1), ("tiny", "j2k", 1, 1)],
    "turnaround": [("tiny", "raw", 2)],
    "sustained": ("tiny", "raw", 3, 120.0),
    "classifier": (["efficientnet_b0"], [1, 4], 0.2),
}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem_kib / 2**20:.0f} GiB RAM, {gpu}; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def ingest_section(cfg: list, work: Path) -> tuple[list[str], dict]:
    from bench.ingest import build_files, compare

    rows = ["| files | images | MB | storescp s | storescp MB/s | storescp img/s | node s | "
            "node MB/s | node img/s | node/dcmtk | storescp+fsync MB/s | node/(dcmtk+fsync) | "
            "node/(dcmtk+sha256+fsync) | storescp peak RSS MiB | node peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for fmt, syntax, studies, repeats in cfg:
        with tempfile.TemporaryDirectory(prefix="mammo-bench-in-", dir=work) as tmp:
            files = build_files(Path(tmp), fmt, syntax, studies)
            r = compare(files, Path(tmp), repeats, f"{fmt} {syntax}")
        (smb, sis), (nmb, nis) = r.rate("storescp"), r.rate("node")
        rows.append(f"| {r.label} | {r.images} | {r.mb:.0f} | {r.seconds['storescp']:.2f} | "
                    f"{smb:.0f} | {sis:.1f} | {r.seconds['node']:.2f} | {nmb:.0f} | {nis:.1f} | "
                    f"**{r.ratio:.2f}** | "
                    + (f"{r.rate('storescp+fsync')[0]:.0f} | **{r.durable_ratio:.2f}** | "
                       + (f"{r.hashed_ratio:.2f} | " if r.hashed_ratio is not None else "n/a | ")
                       if r.durable_ratio is not None else "n/a (no cc) | n/a | n/a | ")
                    + f"{r.peak_rss_mib['storescp']:.0f} | "
                    f"{r.peak_rss_mib['node']:.0f} |")
        ratios[r.label] = r.ratio
    return rows, ratios


def turnaround_section(cfg: list, work: Path, precision: str, tiny: bool
                       ) -> tuple[list[str], dict]:
    from bench import turnaround

    results = [turnaround.run(fmt, syntax, n, warmup=0 if tiny else 1, work=work,
                              precision=precision) for fmt, syntax, n in cfg]
    return turnaround.stage_table(results), {r.label: (r.pct(50), r.pct(95)) for r in results}


def sustained_section(cfg: tuple, work: Path) -> tuple[list[str], dict]:
    from bench import sustained

    fmt, syntax, n, max_s = cfg
    r = sustained.run(fmt, syntax, n, max_seconds=max_s, work=work)
    peaks = r.quarter_peaks()
    rows = ["| studies | seconds | studies/h | RSS min MiB | RSS max MiB | "
            "peak RSS per quarter of the run MiB |", "|---|---|---|---|---|---|"]
    rss = [v for _, v in r.rss_mib]
    rows.append(f"| {r.studies} ({r.label}) | {r.seconds:.0f} | **{r.per_hour:.0f}** | "
                f"{min(rss):.0f} | {max(rss):.0f} | {' → '.join(f'{p:.0f}' for p in peaks)} |")
    step = max(1, len(r.rss_mib) // 12)
    rows.append("")
    rows.append("RSS over time (s: MiB): " + ", ".join(
        f"{t:.0f}: {v:.0f}" for t, v in r.rss_mib[::step]))
    return rows, {"per_hour": r.per_hour, "max_rss": max(rss), "quarters": peaks}


def classifier_section(cfg: tuple, device: str, precision: str) -> tuple[list[str], dict]:
    from bench import classifier

    archs, batches, seconds = cfg
    results = classifier.run(archs, batches, device=device, precision=precision,
                             seconds=seconds)
    shipped = max(r.rois_per_s for r in results if "shipped" in r.model and not r.with_cam)
    return classifier.table(results), {"shipped_best": shipped, "device": results[0].device}


def targets(fig: dict) -> list[str]:
    rows = ["| target | figure | met? |", "|---|---|---|"]
    if "ingest" in fig:
        worst = min(fig["ingest"].values())
        rows.append(f"| ingest ≥ 1.0× dcmtk storescp (node fsyncs, storescp does not) | "
                    f"{', '.join(f'{k} {v:.2f}' for k, v in fig['ingest'].items())} | "
                    f"{'yes' if worst >= 1.0 else 'no'} |")
    if "turnaround" in fig:
        p50, p95 = next(iter(fig["turnaround"].values()))
        label = next(iter(fig["turnaround"]))
        rows.append(f"| turnaround p50 ≤ 5 s, four views, {os.cpu_count()} CPU cores | "
                    f"{label}: p50 {p50:.2f} s, p95 {p95:.2f} s | "
                    f"{'yes' if p50 <= 5 else 'no'} |")
    if "sustained" in fig:
        s = fig["sustained"]
        rows.append(f"| ≥ 1,000 studies/h on one CPU node, RSS < 2 GB | {s['per_hour']:.0f}/h, "
                    f"peak RSS {s['max_rss']:.0f} MiB | "
                    f"{'yes' if s['per_hour'] >= 1000 and s['max_rss'] < 2048 else 'no'} |")
    if "classifier" in fig:
        c = fig["classifier"]
        met = ("yes" if c["shipped_best"] >= 5000 else "no") if c["device"].startswith("cuda") \
            else "not measurable here (no GPU)"
        rows.append(f"| ≥ 5,000 ROIs/s default model on an H100 | {c['shipped_best']:.0f} ROIs/s "
                    f"on {c['device']} | {met} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small and quick (CI)")
    ap.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections ({', '.join(SECTIONS)})")
    ap.add_argument("--device", default="auto", help="classifier device: auto, cpu, cuda[:N]")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--workdir", type=Path, default=None, help="where temporary data goes")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section {bad[0]!r}")
    cfg = TINY if args.tiny else FULL
    cmd = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    out = [f"# mammo-node benchmark{' (tiny: figures mean nothing)' if args.tiny else ''}", "",
           f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
           f"- machine: {machine()}", f"- command: `{cmd.strip()}`", ""]
    figures: dict = {}
    t_all = time.monotonic()

    def emit(title: str, rows: list[str], t0: float) -> None:
        block = [f"## {title}", "", *rows, "", f"({time.monotonic() - t0:.0f} s)", ""]
        out.extend(block)
        print("\n".join(block), flush=True)

    print("\n".join(out), flush=True)
    if "ingest" in only:
        t0 = time.monotonic()
        rows, figures["ingest"] = ingest_section(cfg["ingest"], args.workdir)
        emit("Ingest: dcmtk storescu → node vs → dcmtk storescp (medians, paired ratio)",
             rows, t0)
    if "turnaround" in only:
        t0 = time.monotonic()
        rows, figures["turnaround"] = turnaround_section(cfg["turnaround"], args.workdir,
                                                         args.precision, args.tiny)
        emit("Study turnaround: last instance stored → results acknowledged by the PACS "
             "(seconds)", rows, t0)
    if "sustained" in only:
        t0 = time.monotonic()
        rows, figures["sustained"] = sustained_section(cfg["sustained"], args.workdir)
        emit("Sustained: steady stream of four-view studies", rows, t0)
    if "classifier" in only:
        t0 = time.monotonic()
        rows, figures["classifier"] = classifier_section(cfg["classifier"], args.device,
                                                         args.precision)
        emit("Classifier: ROIs/s", rows, t0)
    emit("Targets", targets(figures), t_all)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
