"""Shadow mode's cost to the active results: study turnaround with shadow mode off, then on.

    .venv/bin/python -m bench.shadow [--fmt small] [--syntax raw] [--studies 8] [--tiny]

Same node (a real process, the shipped model), same studies, sent back to back by storescu
(each as soon as the previous one's results were acknowledged by storescp, the worst case: the
shadow model runs in the gap and is still busy when the next study arrives). With shadow mode
on, a second model (the shipped weights with a shifted head, another name) is installed and
shadows the active one. Prints turnaround p50/p95 off and on, their ratio, and how far the
shadow results lag behind the active ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Harness
from bench.studies import StudyFactory


@dataclass
class ShadowBench:
    mode: str
    turnaround_s: list[float]
    shadow_lag_s: list[float] = field(default_factory=list)
    shadow_done: int = 0

    def pct(self, values: list[float], q: int) -> float:
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1]


def run(mode: str, fmt: str, syntax: str, studies: int, work: Path | None) -> ShadowBench:
    from tests.modelfixtures import variant_card

    factory = StudyFactory(fmt, syntax, tag=f"shadow-{fmt}-{syntax}")
    factory.warm()
    with tempfile.TemporaryDirectory(prefix="mammo-bench-sh-", dir=work) as tmp:
        root = Path(tmp)
        card = (variant_card(root / "cards", "bench-shadow", "1.0.0", logit_shift=-0.5)
                if mode == "on" else None)
        harness = Harness(root, shadow_card=card)
        out = ShadowBench(mode, [])
        try:
            for i in range(1 + studies):  # the first one warms up
                files = factory.write_study(i, root / "send")
                harness.send(files)
                for f in files:
                    f.unlink()
                uid = factory.study_uid(i)
                harness.wait_delivered(uid)
                if i:
                    out.turnaround_s.append(harness.timing(uid).turnaround_s)
                harness.clear_destination()
            if mode == "on":
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and harness._query(
                        "SELECT count(*) FROM shadow_runs WHERE state IN ('queued', 'running')"
                        )[0][0]:
                    time.sleep(0.2)
                rows = harness._query(
                    "SELECT r.created_at, sr.finished_at FROM shadow_runs sr JOIN results r ON "
                    "r.job_id = sr.job_id WHERE sr.state = 'done'")
                out.shadow_done = len(rows)
                out.shadow_lag_s = [(dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a))
                                    .total_seconds() for a, b in rows]
        finally:
            harness.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fmt", default="small", choices=("big", "small", "tiny"))
    p.add_argument("--syntax", default="raw", choices=("raw", "j2k"))
    p.add_argument("--studies", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2,
                   help="off/on alternated this many times (spreads a busy machine's noise)")
    p.add_argument("--tiny", action="store_true", help="tiny images, 2 studies (a smoke run)")
    p.add_argument("--work", type=Path, help="scratch folder (default: the system's)")
    a = p.parse_args(argv)
    fmt, n, rounds = ("tiny", 2, 1) if a.tiny else (a.fmt, a.studies, a.rounds)
    off, on = ShadowBench("off", []), ShadowBench("on", [])
    for _ in range(rounds):
        for total, mode in ((off, "off"), (on, "on")):
            r = run(mode, fmt, a.syntax, n, a.work)
            total.turnaround_s += r.turnaround_s
            total.shadow_lag_s += r.shadow_lag_s
            total.shadow_done += r.shadow_done
    print(f"shadow mode cost, {fmt} {a.syntax}, {n} four-view studies back to back per mode "
          f"and round, {rounds} round(s) alternating off/on")
    print("| shadow | n | turnaround p50 s | p95 s | mean s | shadow runs done | "
          "shadow lag p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (off, on):
        lag = (f"{r.pct(r.shadow_lag_s, 50):.2f} | {r.pct(r.shadow_lag_s, 95):.2f}"
               if r.shadow_lag_s else "- | -")
        print(f"| {r.mode} | {len(r.turnaround_s)} | {r.pct(r.turnaround_s, 50):.2f} | "
              f"{r.pct(r.turnaround_s, 95):.2f} | {statistics.mean(r.turnaround_s):.2f} | "
              f"{r.shadow_done if r.mode == 'on' else '-'} | {lag} |")
    print(f"ratio on/off: p50 {on.pct(on.turnaround_s, 50) / off.pct(off.turnaround_s, 50):.2f}"
          f", p95 {on.pct(on.turnaround_s, 95) / off.pct(off.turnaround_s, 95):.2f}")


if __name__ == "__main__":
    main()
