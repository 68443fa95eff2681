"""Real peers for the network tests: free ports, the node as a process, dcmtk storescp."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.tools import require_binary

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout} s")


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, sections: dict[str, dict[str, object]],
                 destinations: list[dict[str, object]] = ()) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for dest in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in dest.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class NodeProcess:
    """``python -m node serve`` as a real process, with its own config and data_dir."""

    def __init__(self, workdir: Path, destinations: list[dict[str, object]] = (),
                 **sections: dict[str, object]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.data_dir = workdir / "data"
        node = {"ae_title": "MAMMO_AI", "host": "127.0.0.1", "port": self.port,
                "data_dir": str(self.data_dir), "min_free_mb": 16}
        node.update(sections.pop("node", {}))
        cfg = {
            "node": node,
            "study": {"stable_seconds": 3, "check_interval_seconds": 0.5},
            # MAMMO_NODE_TEST_CARD runs the network tests with another model card.
            "model": {"card": os.environ.get("MAMMO_NODE_TEST_CARD",
                                             str(REPO / "models/weights/calc-cluster-lite0.json"))},
            "delivery": {"backoff_initial_seconds": 1, "backoff_max_seconds": 2},
            "log": {"level": "INFO"},
        }
        for k, v in sections.items():
            cfg.setdefault(k, {}).update(v)
        self.port = node["port"]
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(workdir / "node.toml", cfg, list(destinations))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "node.log"
        self.repo = REPO  # the source tree it runs (bench/preanalysis.py: a baseline's worktree)

    def start(self, timeout: float = 120) -> NodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.stderr = open(self.workdir / "node.stderr", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(self.config)],
            cwd=self.repo, env=env, stdout=self.stderr, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self.stderr.close()
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node", *args, "--config", str(self.config)],
            cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )


class StoreSCP:
    """dcmtk ``storescp`` writing what it receives into ``out_dir``."""

    def __init__(self, out_dir: Path, ae_title: str = "DEST") -> None:
        self.out_dir = out_dir
        self.ae_title = ae_title
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        exe = require_binary("storescp")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out_dir.parent / f"storescp-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "-aet", self.ae_title, "-od", str(self.out_dir), "+xa", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, 30, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
            self.log.close()

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def destination(self, name: str = "dest") -> dict[str, object]:
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


def storescu(port: int, files: list[Path], *, aet: str = "MAMMO_AI", calling: str = "MODALITY",
             extra: list[str] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    exe = require_binary("storescu")
    return subprocess.run(
        [exe, "-v", "-aet", calling, "-aec", aet, *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
