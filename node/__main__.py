"""mammo-node command line: serve, echo, send, status, retry, db, hash-secret, model, outcomes
(also ``python -m node``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from node import __version__
from node.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from pynetdicom.association import Association

DEFAULT_CONFIG = "config.toml"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config))


def cmd_serve(args: argparse.Namespace) -> int:
    from node.log import event, setup_logging
    from node.memory import limit_arenas

    # First, while this is the only thread: every arena a stage thread would get is an
    # arena less (node/memory.py).
    arena_max = limit_arenas()
    from node.analysis.allocator import MMAP_THRESHOLD, keep_freed_images

    kept = keep_freed_images()  # freed image-sized blocks reused (node/analysis/allocator.py)
    settings = _settings(args)
    os.umask(0o077)  # everything the node writes (instances, results, log) is private
    lg = settings.log
    setup_logging(lg.level, settings.log_file, lg.max_mb, lg.backup_count,
                  lg.patient_identifiers)
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: stacks to stderr
    import logging

    event(logging.getLogger("node.memory"), "process.allocator",
          arena_max=arena_max if arena_max is not None else "default (not glibc)",
          mmap_threshold_mib=MMAP_THRESHOLD >> 20 if kept else "default")
    from node.service import Node

    roles = None
    if args.roles:
        from node.config import ROLES

        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise ConfigError(f"--roles: {', '.join(bad) or 'empty'} (known: "
                              f"{', '.join(ROLES)})")
    try:
        node = Node(settings, roles=roles)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"mammo-node: cannot start: {exc}", file=sys.stderr)
        return 2
    node.serve_forever()
    return 0


def cmd_hash_secret(args: argparse.Namespace) -> int:
    """Hash a secret read from the terminal (or one line of standard input)."""
    import getpass

    from node.secrets import hash_password, hash_token

    secret = (getpass.getpass("secret: ") if sys.stdin.isatty()
              else sys.stdin.readline().rstrip("\n"))
    if not secret:
        print("mammo-node: empty secret", file=sys.stderr)
        return 2
    hashed = hash_token(secret) if args.token else hash_password(secret)
    print(f"{args.user}:{hashed}" if args.user else hashed)
    return 0


def _target(args: argparse.Namespace, settings: Settings) -> tuple[str, int, str]:
    if args.destination:
        for d in settings.destinations:
            if d.name == args.destination:
                return d.host, d.port, d.ae_title
        raise ConfigError(f"no destination named {args.destination!r} in {args.config}")
    host = args.host or ("127.0.0.1" if settings.node.host in ("0.0.0.0", "::")
                         else settings.node.host)
    return host, args.port or settings.node.port, args.aet or settings.node.ae_title


def _associate(args: argparse.Namespace, contexts: list[tuple[str, list[str] | None]]
               ) -> Association | None:
    """An association with the target of ``args`` proposing ``contexts`` (SOP class, transfer
    syntaxes; None: Explicit and Implicit VR Little Endian); None when it is refused."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    settings = _settings(args)
    host, port, aet = _target(args, settings)
    ae = AE(ae_title=args.calling_aet)
    ae.maximum_pdu_size = 131072
    for uid, syntaxes in contexts:
        ae.add_requested_context(uid, syntaxes or [ExplicitVRLittleEndian,
                                                   ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"mammo-node: no association with {aet}@{host}:{port}", file=sys.stderr)
        return None
    return assoc


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

    assoc = _associate(args, [(Verification, None)])
    if assoc is None:
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else -1
    print(f"C-ECHO status 0x{code:04X}" if code >= 0 else "C-ECHO: no response")
    return 0 if code == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    import pydicom

    files: list[Path] = []
    for name in args.files:
        p = Path(name)
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    headers = [(f, pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
    contexts: dict[str, set[str]] = {}
    for _, ds in headers:
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    assoc = _associate(args, [(uid, sorted(ts)) for uid, ts in contexts.items()])
    if assoc is None:
        return 1
    failures = 0
    try:
        from node.fastsend import leave_previous_pause

        for n, (f, _) in enumerate(headers):
            if n:  # pynetdicom's pause may still read as set from the last one (node.fastsend)
                leave_previous_pause(assoc)
            status = assoc.send_c_store(pydicom.dcmread(f))
            code = int(status.Status) if status and "Status" in status else -1
            print(f"{f}: " + (f"0x{code:04X}" if code >= 0 else "no response"))
            failures += code not in (0x0000, 0xB000, 0xB006, 0xB007)
    finally:
        assoc.release()
    return 1 if failures else 0


def cmd_status(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from node.db import Database, Delivery, Job, Result, Study
    from node.output_failures import failed_output_kinds

    settings = _settings(args)
    db = Database(settings.database_url)
    db.create_schema()
    with db.session() as s:
        studies = Counter(dict(s.execute(select(Study.state, func.count()).group_by(Study.state)
                                         ).all()))
        jobs = Counter(dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all()))
        deliveries = Counter(dict(s.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state)).all()))
        errors = []
        for d, study_uid in s.execute(
            select(Delivery, Study.study_uid).join(Result, Result.id == Delivery.result_id)
            .join(Study, Study.id == Result.study_id).where(Delivery.last_error.is_not(None))
            .order_by(Delivery.id.desc()).limit(args.errors)
        ).all():
            errors.append({"kind": "delivery", "study": study_uid, "destination": d.destination,
                           "state": d.state, "attempts": d.attempts, "error": d.last_error})
        for j, study_uid in s.execute(
            select(Job, Study.study_uid).join(Study, Study.id == Job.study_id)
            .where(Job.error.is_not(None)).order_by(Job.id.desc()).limit(args.errors)
        ).all():
            errors.append({"kind": "analysis", "study": study_uid, "state": j.state,
                           "attempts": j.attempts, "error": j.error})
        failed_outputs = failed_output_kinds(s, args.errors)
    from node.status_page import outcome_counts

    outcomes, not_analysed = outcome_counts(db)
    from node.cluster import describe_nodes

    with db.session() as s:
        nodes = describe_nodes(s)
    report = {
        "queue_depth": jobs.get("queued", 0) + jobs.get("running", 0),
        "nodes": nodes,
        "studies": dict(studies), "jobs": dict(jobs), "deliveries": dict(deliveries),
        "failed_outputs": failed_outputs,
        "instances": outcomes,
        "not_analysed": [{"outcome": o, "reason": r, "instances": n}
                         for o, r, n in not_analysed],
        "recent_errors": errors,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"queue depth: {report['queue_depth']} (queued {jobs.get('queued', 0)}, "
          f"running {jobs.get('running', 0)})")
    print("studies: " + (", ".join(f"{k} {v}" for k, v in sorted(studies.items())) or "none"))
    print(f"nodes: {len(nodes)}")
    for n in nodes:
        holds = ", ".join(f"{k} {v}" for k, v in sorted(n["holds"].items())) or "nothing"
        print(f"  {n['name']} [{','.join(n['roles'])}] {n['state']} on {n['host']} pid "
              f"{n['pid']}, heartbeat {n['heartbeat_age_s']:.0f} s ago, holds {holds}")
    print("deliveries: " + (", ".join(f"{k} {v}" for k, v in sorted(deliveries.items()))
                            or "none"))
    print("instances: " + ", ".join(f"{k} {outcomes.get(k, 0)}"
                                    for k in ("analysed", "skipped", "failed", "pending")))
    for outcome, reason, count in not_analysed:
        print(f"  {outcome} {count}: {reason}")
    if failed_outputs:
        print("failed output kinds (the other kinds were delivered; `mammo-node retry` "
              "rebuilds or re-sends them):")
        for f in failed_outputs:
            where = f" -> {f['destination']}" if f.get("destination") else ""
            print(f"  {f['kind']} ({f['stage']}{where}) study={f['study']} state={f['state']}: "
                  f"{f['error']}")
    if errors:
        print("recent errors:")
        for e in errors:
            where = f" -> {e['destination']}" if e.get("destination") else ""
            print(f"  {e['kind']}{where} study={e['study']} state={e['state']} "
                  f"attempts={e['attempts']}: {e['error']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from node import queue
    from node.db import Database, Study

    settings = _settings(args)
    db = Database(settings.database_url)
    db.create_schema()
    with db.session() as s:
        study_ids = None
        if args.study:
            study_ids = list(s.execute(select(Study.id).where(Study.study_uid == args.study)
                                       ).scalars())
        r = queue.retry_failed(s, study_ids)
    print(f"re-queued {r.deliveries} failed deliveries and {r.jobs} failed analyses; "
          f"{r.kinds} failed output kinds of {r.kind_studies} studies will be rebuilt")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """``db upgrade``: apply the schema migrations; ``db current``: where the schema is."""
    from node import migrate
    from node.db import Database

    settings = _settings(args)
    db = Database(settings.database_url)
    if args.action == "current":
        current, head = migrate.current_revision(db), migrate.head_revision()
        print(f"schema revision {current or 'none'} (this release: {head})"
              + ("" if current == head else "; run `mammo-node db upgrade`"))
        return 0 if current == head else 1
    before, after = migrate.upgrade(db)
    print(f"schema revision {before or 'none'} -> {after}" if before != after
          else f"schema revision {after}: already current")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mammo-node", description=__doc__)
    p.add_argument("--version", action="version", version=f"mammo-node {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=DEFAULT_CONFIG,
                        help="configuration file (default: ./config.toml)")

    def network(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--destination", help="talk to this [[destinations]] entry instead "
                                              "of the node itself")
        sp.add_argument("--host", help="override the host")
        sp.add_argument("--port", type=int, help="override the port")
        sp.add_argument("--aet", help="override the called AE title")
        sp.add_argument("--calling-aet", default="MAMMO_CLI", help="our AE title")

    sp = sub.add_parser("serve", help="run the node (listener, worker, delivery)")
    common(sp)
    sp.add_argument("--roles", help="comma-separated: receive, analyse, deliver (default: "
                                    "[cluster] roles, all three)")
    sp.set_defaults(func=cmd_serve)
    sp = sub.add_parser("echo", help="C-ECHO the node (or a destination)")
    common(sp)
    network(sp)
    sp.set_defaults(func=cmd_echo)
    sp = sub.add_parser("send", help="C-STORE files or folders to the node (or a destination)")
    common(sp)
    network(sp)
    sp.add_argument("files", nargs="+")
    sp.set_defaults(func=cmd_send)
    sp = sub.add_parser("status", help="queue depth, studies per state, recent errors")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--errors", type=int, default=10, help="how many recent errors to show")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("hash-secret", help="hash a password (or --token) for [dicomweb] "
                                            "users_file / tokens_file")
    sp.add_argument("--token", action="store_true", help="a bearer token (SHA-256)")
    sp.add_argument("--user", help="print a users_file line NAME:HASH")
    sp.set_defaults(func=cmd_hash_secret)
    sp = sub.add_parser("db", help="database schema: upgrade (apply the migrations) or "
                                   "current (show the revision)")
    common(sp)
    sp.add_argument("action", choices=("upgrade", "current"))
    sp.set_defaults(func=cmd_db)
    sp = sub.add_parser("retry", help="re-queue failed deliveries and analyses")
    common(sp)
    sp.add_argument("--study", help="only this Study Instance UID")
    sp.set_defaults(func=cmd_retry)
    from node.model_cli import add_commands  # model ..., outcomes ... (issue 17)

    add_commands(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mammo-node: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
