"""How a standalone bench publishes its figures: printed, and appended to ``--out`` if given."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path | None) -> None:
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
