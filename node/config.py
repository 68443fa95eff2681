"""config.toml -> typed, validated settings. The only reader of the configuration file.

Every section is a frozen dataclass. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` whose message names the key (``node.port``, ``destinations[1].host``, ...).
Relative paths are resolved against the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from node.kinds import KINDS

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash


class ConfigError(ValueError):
    """A problem in the configuration; the message names the key."""


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "MAMMO_AI"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: list[str] = field(default_factory=list)
    allowed_peer_ips: list[str] = field(default_factory=list)
    data_dir: Path = Path("var")
    max_pdu_size: int = 131072
    max_associations: int = 16
    network_timeout: int = 60
    min_free_mb: int = 1024
    # Admission (node.admission): per-peer limits and a reserve for trusted peers.
    max_associations_per_ip: int = 8
    max_associations_per_ae: int = 8
    trusted_peers: list[str] = field(default_factory=list)  # "AE@address", "AE@*", "*@net"
    reserved_associations: int = 4
    # Read deadlines (node.fastrecv): A-ASSOCIATE-RQ after connect, silence inside a PDU, and
    # the slowest rate a PDU may arrive at once it started.
    acse_timeout: float = 10
    pdu_timeout: float = 10
    min_receive_rate_kib: float = 8
    shutdown_timeout: float = 10


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""
    # "auto": apply the Alembic migrations at start-up; "off": refuse to start on a database
    # whose schema is older than this release (the admin runs `mammo-node db upgrade`).
    migrate: str = "auto"


ROLES = ("receive", "analyse", "deliver")


@dataclass(frozen=True)
class ClusterSettings:
    """Several nodes sharing one queue (node.cluster, node.queue)."""

    node_name: str = ""  # unique per node; "" = "<host name>:<node.port>"
    roles: list[str] = field(default_factory=lambda: list(ROLES))
    lease_seconds: float = 30
    heartbeat_seconds: float = 5


def _default_other_sop_classes() -> list[str]:
    from node.intake import DEFAULT_OTHER_SOP_CLASSES

    return list(DEFAULT_OTHER_SOP_CLASSES)


@dataclass(frozen=True)
class StudySettings:
    stable_seconds: float = 30
    complete_on_four_views: bool = True
    check_interval_seconds: float = 2
    # Accepted with a study (0x0000) but never analysed (node.intake); see config.toml.
    other_sop_classes: list[str] = field(default_factory=_default_other_sop_classes)
    other_objects: str = "discard"  # "discard" | "keep"


@dataclass(frozen=True)
class AnalysisSettings:
    for_processing: str = "analyse"
    synthesized_2d: str = "skip"  # "skip" | "analyse"
    fallback_pixel_spacing_mm: float = 0.1
    sc_max_side: int = 2048
    detector_operating_point: str | float = "card"
    max_rois_per_image: int = 20
    # Bounds per study (node.worker) and on concurrent decoding (node.decode_limits).
    max_images_per_study: int = 16
    max_study_seconds: float = 600
    decode_memory_mb: int = 2048
    # Per-instance pre-analysis (node.preanalysis): threads, and images queued at most.
    preanalysis_workers: int = 2
    preanalysis_queue: int = 32


@dataclass(frozen=True)
class LimitsSettings:
    """Declared image sizes accepted at C-STORE and before any decode (node.decode_limits)."""

    max_rows: int = 16384
    max_columns: int = 16384
    max_frames: int = 1000
    max_decoded_mb: int = 8192


#: The model card shipped with the node (inside the installed ``models`` package, next to its
#: weights): the default of ``[model] card`` wherever the configuration file lives.
SHIPPED_CARD_NAME = "models/weights/calc-cluster-lite0.json"
SHIPPED_CARD = Path(__file__).resolve().parents[1] / SHIPPED_CARD_NAME


@dataclass(frozen=True)
class ModelSettings:
    card: Path = SHIPPED_CARD
    architecture: str = "tf_efficientnet_lite0"
    device: str = "auto"
    batch_size: int = 16
    threshold: str | float = "card"
    precision: str = "auto"


@dataclass(frozen=True)
class OutputSettings:
    manufacturer: str = "mammo-node"
    sr_series_number: int = 9901
    sc_series_number: int = 9902
    # Output kinds (node.kinds): tid1500, mammo_cad, gsps, sc.
    objects: list[str] = field(default_factory=lambda: ["tid1500", "sc"])
    cad_operating_point: str | float = "card"
    cad_sr_series_number: int = 9903
    gsps_series_number: int = 9904


@dataclass(frozen=True)
class DeliverySettings:
    max_attempts: int = 6
    backoff_initial_seconds: float = 5
    backoff_max_seconds: float = 600


@dataclass(frozen=True)
class RetentionSettings:
    days: float = 30
    check_interval_hours: float = 6


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"
    file: str = ""
    max_mb: float = 50
    backup_count: int = 10
    patient_identifiers: bool = False


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    recent_studies: int = 50
    refresh_seconds: int = 10
    request_timeout: float = 10
    idle_timeout: float = 5
    max_connections: int = 32


@dataclass(frozen=True)
class TLSSettings:
    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = True
    handshake_timeout_seconds: float = 10


@dataclass(frozen=True)
class DicomwebSettings:
    """[dicomweb]: the STOW-RS receiver (node/stow.py). Off by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8042
    auth: str = "basic"  # "basic", "bearer" or "none"
    users_file: str = ""  # basic: lines "name:<hash from `mammo-node hash-secret`>"
    tokens_file: str = ""  # bearer: lines "<hash from `mammo-node hash-secret`>"
    tls: bool = False  # HTTPS with [tls] certificate/private_key
    max_request_mb: int = 2048
    timeout_seconds: float = 60
    allowed_peer_ips: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    objects: list[str] | None = None  # None: [output] objects
    tls: bool = False
    # type = "dicomweb": STOW-RS to url (node/stow_client.py) instead of C-STORE.
    type: str = "dicom"
    url: str = ""
    auth: str = "none"  # "none", "basic" or "bearer"
    username: str = ""
    password_file: str = ""
    token_file: str = ""
    tls_verify: bool = True
    ca_certificates: str = ""  # PEM bundle that verifies the server; empty: the system's CAs
    timeout_seconds: float = 60


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    study: StudySettings = field(default_factory=StudySettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    log: LogSettings = field(default_factory=LogSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    dicomweb: DicomwebSettings = field(default_factory=DicomwebSettings)
    destinations: list[Destination] = field(default_factory=list)
    source: Path | None = None  # the file these settings came from

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.node.data_dir / 'node.sqlite3'}"

    @property
    def log_file(self) -> Path:
        return Path(self.log.file) if self.log.file else self.node.data_dir / "node.log"

    @property
    def detector_operating_point_override(self) -> float | None:
        """The configured detector operating point, or None for the detector file's."""
        op = self.analysis.detector_operating_point
        return None if op == "card" else float(op)

    @property
    def threshold_override(self) -> float | None:
        return None if self.model.threshold == "card" else float(self.model.threshold)

    def objects_for(self, destination: Destination) -> list[str]:
        """The output kinds sent to ``destination``."""
        return list(self.output.objects if destination.objects is None else destination.objects)

    @property
    def report_kinds(self) -> list[str]:
        """The output kinds to build: every kind some destination wants ([output] objects
        when there is no destination, so that the results are kept)."""
        lists = [self.objects_for(d) for d in self.destinations] or [self.output.objects]
        return [k for k in ("tid1500", "mammo_cad", "gsps", "sc") if any(k in x for x in lists)]

    @property
    def cad_operating_point_override(self) -> float | None:
        """The CAD SR operating point, or None for the model card's threshold."""
        op = self.output.cad_operating_point
        return None if op == "card" else float(op)


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "database": DatabaseSettings,
    "cluster": ClusterSettings,
    "study": StudySettings,
    "analysis": AnalysisSettings,
    "limits": LimitsSettings,
    "model": ModelSettings,
    "output": OutputSettings,
    "delivery": DeliverySettings,
    "retention": RetentionSettings,
    "log": LogSettings,
    "http": HttpSettings,
    "tls": TLSSettings,
    "dicomweb": DicomwebSettings,
}


def load_settings(path: Path | str, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Read and validate ``path``; ``overrides`` (section -> key -> value) win over the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        if section == "destinations":
            raw["destinations"] = values
        else:
            raw.setdefault(section, {}).update(values)
    return parse_settings(raw, base_dir=path.resolve().parent, source=path.resolve())


def parse_settings(raw: dict[str, Any], base_dir: Path, source: Path | None = None) -> Settings:
    unknown = sorted(set(raw) - set(_SECTIONS) - {"destinations"})
    if unknown:
        raise ConfigError(f"unknown section or key {unknown[0]!r} (known: "
                          f"{', '.join(sorted([*_SECTIONS, 'destinations']))})")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{name} must be a table ([{name}])")
        kwargs[name] = _build(cls, section, name, base_dir)
    kwargs["model"] = _shipped_card_fallback(kwargs["model"], raw.get("model", {}), base_dir)
    kwargs["tls"] = dataclasses.replace(kwargs["tls"], **{  # files relative to the config
        k: str(base_dir / Path(v).expanduser()) for k in ("certificate", "private_key",
                                                          "ca_certificates")
        if (v := getattr(kwargs["tls"], k))})
    dests = raw.get("destinations", [])
    if not isinstance(dests, list):
        raise ConfigError("destinations must be an array of tables ([[destinations]])")
    kwargs["destinations"] = [
        _relative_files(_build(Destination, d, f"destinations[{i}]", base_dir), base_dir,
                        ("password_file", "token_file", "ca_certificates"))
        for i, d in enumerate(dests)
    ]
    kwargs["dicomweb"] = _relative_files(kwargs["dicomweb"], base_dir,
                                         ("users_file", "tokens_file"))
    settings = Settings(**kwargs, source=source)
    _validate(settings)
    return settings


def _relative_files(obj: Any, base_dir: Path, keys: tuple[str, ...]) -> Any:
    """``obj`` with its non-empty file keys resolved against the configuration's folder."""
    return dataclasses.replace(obj, **{k: str(base_dir / Path(v).expanduser())
                                       for k in keys if (v := getattr(obj, k))})


def _shipped_card_fallback(model: ModelSettings, raw: dict[str, Any], base_dir: Path
                           ) -> ModelSettings:
    """``[model] card`` naming the shipped model works wherever the config file is.

    Relative paths are relative to the configuration file. The default configuration says
    ``card = "models/weights/calc-cluster-lite0.json"``: copied elsewhere (e.g.
    ``/etc/mammo-node/config.toml``) that path does not exist there, and the packaged card is
    meant, so it is used. Any other path, or that one when it does exist beside the config
    file, is taken as it is."""
    value = raw.get("card") if isinstance(raw, dict) else None
    if value is None:
        return model  # absent: the packaged default
    if (isinstance(value, str) and Path(value).as_posix().removeprefix("./") == SHIPPED_CARD_NAME
            and not (base_dir / value).exists()):
        return dataclasses.replace(model, card=SHIPPED_CARD)
    return model


def _build(cls: type, values: dict[str, Any], prefix: str, base_dir: Path) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a table")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}")
    out: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key {key}")
            continue
        out[name] = _coerce(values[name], hints[name], key, base_dir)
    return cls(**out)


def _coerce(value: Any, hint: Any, key: str, base_dir: Path) -> Any:
    origin = get_origin(hint)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", base_dir) for i, v in enumerate(value)]
    args = get_args(hint)
    if args:  # a union such as str | float: accept any member type
        for arg in args:
            try:
                return _coerce(value, arg, key, base_dir)
            except ConfigError:
                continue
        raise ConfigError(f"{key} has an unsupported value {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key} {msg}")


_OUTPUT_KINDS = KINDS


def _check_objects(objects: list[str], key: str) -> None:
    _check(bool(objects), key, f"must name at least one of {', '.join(_OUTPUT_KINDS)}")
    for i, kind in enumerate(objects):
        _check(kind in _OUTPUT_KINDS, f"{key}[{i}]",
               f"is not an output kind: {kind!r} (known: {', '.join(_OUTPUT_KINDS)})")
    _check(len(set(objects)) == len(objects), key, "lists an output kind twice")


def _validate_outputs(s: Settings) -> None:
    o = s.output
    _check_objects(o.objects, "output.objects")
    if isinstance(o.cad_operating_point, str):
        _check(o.cad_operating_point == "card", "output.cad_operating_point",
               f"must be \"card\" or a number in [0, 1], got {o.cad_operating_point!r}")
    else:
        _check(0.0 <= o.cad_operating_point <= 1.0, "output.cad_operating_point",
               f"must be in [0, 1], got {o.cad_operating_point}")
    numbers = {"output.sr_series_number": o.sr_series_number,
               "output.sc_series_number": o.sc_series_number,
               "output.cad_sr_series_number": o.cad_sr_series_number,
               "output.gsps_series_number": o.gsps_series_number}
    seen: dict[int, str] = {}
    for key, value in numbers.items():
        _check(1 <= value < 2**31, key, "out of range")
        _check(value not in seen, key, f"must differ from {seen.get(value)}")
        seen[value] = key
    for i, dest in enumerate(s.destinations):
        if dest.objects is not None:
            _check_objects(dest.objects, f"destinations[{i}].objects")


def _validate_cluster(s: Settings) -> None:
    c = s.cluster
    _check(s.database.migrate in ("auto", "off"), "database.migrate",
           f"must be \"auto\" or \"off\", got {s.database.migrate!r}")
    _check(bool(c.roles), "cluster.roles", "must name at least one role")
    for i, role in enumerate(c.roles):
        _check(role in ROLES, f"cluster.roles[{i}]",
               f"must be one of {', '.join(ROLES)}, got {role!r}")
    _check(len(c.node_name) <= 64, "cluster.node_name", "must be at most 64 characters")
    _check(c.heartbeat_seconds > 0, "cluster.heartbeat_seconds", "must be positive")
    _check(c.lease_seconds >= 2 * c.heartbeat_seconds, "cluster.lease_seconds",
           "must be at least twice cluster.heartbeat_seconds (a lease survives a missed "
           "heartbeat)")


def _validate(s: Settings) -> None:
    n = s.node
    _check(bool(_AE_RE.match(n.ae_title.strip() or "")), "node.ae_title",
           "must be 1-16 printable ASCII characters without backslash")
    _check(0 < n.port < 65536, "node.port", f"must be 1-65535, got {n.port}")
    for i, aet in enumerate(n.allowed_calling_aets):
        _check(bool(_AE_RE.match(aet)), f"node.allowed_calling_aets[{i}]",
               f"is not a valid AE title: {aet!r}")
    _check(n.max_pdu_size == 0 or n.max_pdu_size >= 4096, "node.max_pdu_size",
           "must be 0 (unlimited) or at least 4096")
    _check(n.max_associations >= 1, "node.max_associations", "must be at least 1")
    _check(n.network_timeout > 0, "node.network_timeout", "must be positive")
    _check(n.min_free_mb >= 0, "node.min_free_mb", "must not be negative")
    _validate_admission(s)
    _validate_cluster(s)
    _check(s.study.stable_seconds >= 0, "study.stable_seconds", "must not be negative")
    _check(s.study.check_interval_seconds > 0, "study.check_interval_seconds",
           "must be positive")
    _check(s.analysis.for_processing in ("analyse", "skip"), "analysis.for_processing",
           f"must be \"analyse\" or \"skip\", got {s.analysis.for_processing!r}")
    _check(s.analysis.synthesized_2d in ("analyse", "skip"), "analysis.synthesized_2d",
           f"must be \"analyse\" or \"skip\", got {s.analysis.synthesized_2d!r}")
    _check(s.study.other_objects in ("discard", "keep"), "study.other_objects",
           f"must be \"discard\" or \"keep\", got {s.study.other_objects!r}")
    from node.intake import ANALYSED_SOP_CLASSES

    for i, uid in enumerate(s.study.other_sop_classes):
        key = f"study.other_sop_classes[{i}]"
        _check(bool(re.match(r"^[0-9]+(\.[0-9]+)*$", uid)) and len(uid) <= 64, key,
               f"is not a UID: {uid!r}")
        _check(uid not in ANALYSED_SOP_CLASSES, key,
               f"{uid} is analysed by the node; it cannot also be listed as not analysed")
    _check(len(set(s.study.other_sop_classes)) == len(s.study.other_sop_classes),
           "study.other_sop_classes", "lists a SOP class twice")
    _check(0.01 <= s.analysis.fallback_pixel_spacing_mm <= 1.0,
           "analysis.fallback_pixel_spacing_mm", "must be between 0.01 and 1.0 mm")
    _check(256 <= s.analysis.sc_max_side <= 16384, "analysis.sc_max_side",
           "must be between 256 and 16384")
    op = s.analysis.detector_operating_point
    if isinstance(op, str):
        _check(op == "card", "analysis.detector_operating_point",
               f"must be \"card\" or a cluster score in [0, 1], got {op!r}")
    else:
        _check(0.0 <= op <= 1.0, "analysis.detector_operating_point",
               f"must be in [0, 1] (a cluster score), got {op}")
    _check(1 <= s.analysis.max_rois_per_image <= 1000, "analysis.max_rois_per_image",
           "must be between 1 and 1000")
    _check(1 <= s.analysis.max_images_per_study <= 10000, "analysis.max_images_per_study",
           "must be between 1 and 10000")
    _check(s.analysis.max_study_seconds > 0, "analysis.max_study_seconds", "must be positive")
    _check(s.analysis.decode_memory_mb >= 64, "analysis.decode_memory_mb",
           "must be at least 64")
    _check(0 <= s.analysis.preanalysis_workers <= 64, "analysis.preanalysis_workers",
           "must be between 0 (off) and 64")
    _check(1 <= s.analysis.preanalysis_queue <= 10000, "analysis.preanalysis_queue",
           "must be between 1 and 10000")
    lim = s.limits
    for key, value in (("max_rows", lim.max_rows), ("max_columns", lim.max_columns)):
        _check(1 <= value <= 65535, f"limits.{key}", "must be between 1 and 65535")
    _check(lim.max_frames >= 1, "limits.max_frames", "must be at least 1")
    _check(lim.max_decoded_mb >= 1, "limits.max_decoded_mb", "must be at least 1")
    m = s.model
    _check(m.device == "auto" or m.device == "cpu" or bool(re.match(r"^cuda(:\d+)?$", m.device)),
           "model.device", f"must be auto, cpu, cuda or cuda:N, got {m.device!r}")
    _check(m.batch_size >= 1, "model.batch_size", "must be at least 1")
    _check(m.precision in ("auto", "fp32", "bf16", "fp16"), "model.precision",
           f"must be auto, fp32, bf16 or fp16, got {m.precision!r}")
    if isinstance(m.threshold, str):
        _check(m.threshold == "card", "model.threshold", "must be \"card\" or a number in (0, 1)")
    else:
        _check(0.0 < m.threshold < 1.0, "model.threshold", "must be in (0, 1)")
    _check(bool(m.architecture), "model.architecture", "must not be empty")
    _check(1 <= s.output.sr_series_number < 2**31, "output.sr_series_number", "out of range")
    _check(1 <= s.output.sc_series_number < 2**31, "output.sc_series_number", "out of range")
    _check(s.output.sr_series_number != s.output.sc_series_number, "output.sc_series_number",
           "must differ from output.sr_series_number")
    _validate_outputs(s)
    d = s.delivery
    _check(d.max_attempts >= 1, "delivery.max_attempts", "must be at least 1")
    _check(d.backoff_initial_seconds > 0, "delivery.backoff_initial_seconds", "must be positive")
    _check(d.backoff_max_seconds >= d.backoff_initial_seconds, "delivery.backoff_max_seconds",
           "must be at least delivery.backoff_initial_seconds")
    _check(s.retention.days >= 0, "retention.days", "must not be negative")
    _check(s.retention.check_interval_hours > 0, "retention.check_interval_hours",
           "must be positive")
    _check(s.log.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log.level",
           f"must be DEBUG, INFO, WARNING or ERROR, got {s.log.level!r}")
    _check(s.log.max_mb > 0, "log.max_mb", "must be positive")
    _check(s.log.backup_count >= 0, "log.backup_count", "must not be negative")
    h = s.http
    _check(bool(h.host), "http.host", "must not be empty")
    _check(0 < h.port < 65536, "http.port", f"must be 1-65535, got {h.port}")
    _check(1 <= h.recent_studies <= 10000, "http.recent_studies", "must be between 1 and 10000")
    _check(h.refresh_seconds >= 0, "http.refresh_seconds", "must not be negative")
    _check(h.request_timeout > 0, "http.request_timeout", "must be positive")
    _check(h.idle_timeout > 0, "http.idle_timeout", "must be positive")
    _check(h.max_connections >= 1, "http.max_connections", "must be at least 1")
    _check_networks(n.allowed_peer_ips, "node.allowed_peer_ips")
    _validate_tls(s)
    names = set()
    for i, dest in enumerate(s.destinations):
        key = f"destinations[{i}]"
        _check(bool(dest.name) and dest.name not in names, f"{key}.name",
               f"must be non-empty and unique, got {dest.name!r}")
        names.add(dest.name)
        _check(dest.type in ("dicom", "dicomweb"), f"{key}.type",
               f"must be \"dicom\" (C-STORE) or \"dicomweb\" (STOW-RS), got {dest.type!r}")
        if dest.type == "dicomweb":
            _validate_dicomweb_destination(dest, key)
            continue
        _check(bool(_AE_RE.match(dest.ae_title)), f"{key}.ae_title",
               f"is not a valid AE title: {dest.ae_title!r}")
        _check(bool(dest.host), f"{key}.host", "must not be empty")
        _check(0 < dest.port < 65536, f"{key}.port", f"must be 1-65535, got {dest.port}")
    _validate_dicomweb(s)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _validate_dicomweb_destination(dest: Destination, key: str) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(dest.url)
    _check(url.scheme in ("http", "https") and bool(url.hostname), f"{key}.url",
           f"must be an http:// or https:// DICOMweb root, got {dest.url!r}")
    _check(not url.username and not url.password, f"{key}.url",
           "must not carry credentials (use auth, username and password_file)")
    _check(dest.auth in ("none", "basic", "bearer"), f"{key}.auth",
           f"must be \"none\", \"basic\" or \"bearer\", got {dest.auth!r}")
    _check(dest.timeout_seconds > 0, f"{key}.timeout_seconds", "must be positive")
    if dest.auth == "basic":
        _check(bool(dest.username), f"{key}.username", "must be set for auth = \"basic\"")
        _check(bool(dest.password_file) and Path(dest.password_file).is_file(),
               f"{key}.password_file", "must name a file holding the password")
    if dest.auth == "bearer":
        _check(bool(dest.token_file) and Path(dest.token_file).is_file(), f"{key}.token_file",
               "must name a file holding the token")
    if dest.auth != "none":
        _check(url.scheme == "https" or _is_loopback(url.hostname or ""), f"{key}.url",
               "must be https:// when credentials are sent (plain http only to loopback)")
    if dest.ca_certificates:
        _check(Path(dest.ca_certificates).is_file(), f"{key}.ca_certificates",
               f"file {dest.ca_certificates} does not exist")


def _validate_dicomweb(s: Settings) -> None:
    w = s.dicomweb
    if not w.enabled:
        return
    _check(0 < w.port < 65536, "dicomweb.port", f"must be 1-65535, got {w.port}")
    _check(w.port != s.node.port, "dicomweb.port", "must differ from node.port")
    _check(not (s.http.enabled and w.port == s.http.port and w.host == s.http.host),
           "dicomweb.port", "must differ from http.port")
    _check(w.auth in ("none", "basic", "bearer"), "dicomweb.auth",
           f"must be \"basic\", \"bearer\" or \"none\", got {w.auth!r}")
    if w.auth == "basic":
        _check(bool(w.users_file) and Path(w.users_file).is_file(), "dicomweb.users_file",
               "must name a file of \"name:hash\" lines (mammo-node hash-secret)")
    if w.auth == "bearer":
        _check(bool(w.tokens_file) and Path(w.tokens_file).is_file(), "dicomweb.tokens_file",
               "must name a file of token hashes (mammo-node hash-secret)")
    if w.auth != "none" and not w.tls:
        _check(_is_loopback(w.host), "dicomweb.tls",
               "must be true when credentials are accepted on a non-loopback address")
    if w.tls:
        _check(bool(s.tls.certificate) and bool(s.tls.private_key), "dicomweb.tls",
               "needs tls.certificate and tls.private_key")
    _check(1 <= w.max_request_mb <= 65536, "dicomweb.max_request_mb",
           "must be between 1 and 65536")
    _check(w.timeout_seconds > 0, "dicomweb.timeout_seconds", "must be positive")
    _check_networks(w.allowed_peer_ips, "dicomweb.allowed_peer_ips")


def _check_networks(entries: list[str], key: str) -> None:
    for i, entry in enumerate(entries):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}] is not an IP address or network: {entry!r}") from None


def parse_trusted_peer(entry: str) -> tuple[str | None, str | None]:
    """``"PACS@10.0.0.5"`` -> (AE title or None for any, address/network or None for any)."""
    if "@" not in entry:
        raise ValueError("must be AE@ADDRESS (either part may be *)")
    aet, _, address = entry.rpartition("@")
    aet, address = aet.strip(), address.strip()
    if aet != "*" and not _AE_RE.match(aet):
        raise ValueError(f"{aet!r} is not a valid AE title")
    if address != "*":
        ipaddress.ip_network(address, strict=False)  # ValueError when it is not one
    if aet == "*" and address == "*":
        raise ValueError("\"*@*\" would trust everyone")
    return (None if aet == "*" else aet), (None if address == "*" else address)


def _validate_admission(s: Settings) -> None:
    n = s.node
    _check(n.max_associations_per_ip >= 1, "node.max_associations_per_ip", "must be at least 1")
    _check(n.max_associations_per_ae >= 1, "node.max_associations_per_ae", "must be at least 1")
    _check(n.reserved_associations >= 0, "node.reserved_associations", "must not be negative")
    for i, entry in enumerate(n.trusted_peers):
        try:
            parse_trusted_peer(entry)
        except ValueError as exc:
            raise ConfigError(f"node.trusted_peers[{i}] {entry!r}: {exc}") from None
    _check(0 < n.acse_timeout <= 600, "node.acse_timeout", "must be between 0 and 600 s")
    _check(0 < n.pdu_timeout <= n.network_timeout, "node.pdu_timeout",
           "must be positive and at most node.network_timeout")
    _check(n.min_receive_rate_kib >= 0, "node.min_receive_rate_kib", "must not be negative")
    _check(0 < n.shutdown_timeout <= 3600, "node.shutdown_timeout",
           "must be between 0 and 3600 s")


def _validate_tls(s: Settings) -> None:
    t = s.tls
    uses_tls = t.enabled or any(d.tls for d in s.destinations if d.type == "dicom")
    _check(t.handshake_timeout_seconds > 0, "tls.handshake_timeout_seconds", "must be positive")
    if not uses_tls:
        return
    needed = [("ca_certificates", t.ca_certificates)]
    if t.enabled:
        needed += [("certificate", t.certificate), ("private_key", t.private_key)]
    for key, value in needed:
        _check(bool(value), f"tls.{key}", "must name a PEM file when TLS is used "
                                          "(tls.enabled or a destination with tls = true)")
        _check(Path(value).is_file(), f"tls.{key}", f"file {value} does not exist")
    for key, value in (("certificate", t.certificate), ("private_key", t.private_key)):
        _check(not value or Path(value).is_file(), f"tls.{key}", f"file {value} does not exist")
