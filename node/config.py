"""config.toml -> typed, validated settings. The only reader of the configuration file.

Every section is a frozen dataclass whose ``__post_init__`` checks its own fields, each check
next to the field it is about, so a section object that exists is valid: the stages that take
one (``Receiver(node, ...)``, the analysis pipeline, the deliverer) trust it and check nothing
again. Checks that relate two sections (a destination's TLS needs ``[tls]`` files, the STOW-RS
port must differ from ``node.port``, destination names are unique) are :class:`Settings`'s.
Enumerated values are ``Literal`` types. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` whose message names the key (``node.port``, ``destinations[1].host``, ...).
Relative paths are resolved against the directory of the configuration file, before the
section is built (so its checks see the real file).

Why dataclasses and not pydantic: the sections were dataclasses already and every message a
PACS admin reads today names the key in this module's words (``node.port must be 1-65535, got
0``), which the tests pin; pydantic's error texts would need a translation layer to keep them,
and the node would gain a dependency for what ~100 lines of coercion below already do.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from node.kinds import KINDS

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash


class ConfigError(ValueError):
    """A problem in the configuration; the message names the key."""


class FieldError(ConfigError):
    """A section's own check failed: ``field`` (e.g. ``port``, ``roles[1]``) is relative to the
    section, so that the parser can name it where it is (``destinations[2].port``)."""

    def __init__(self, section: str, field: str, detail: str) -> None:
        super().__init__(f"{section}.{field} {detail}")
        self.field, self.detail = field, detail


class _Section:
    """Mixin of the section dataclasses: the key prefix of their messages and their check."""

    SECTION: ClassVar[str] = ""
    #: String fields naming files, resolved against the configuration's folder before the
    #: section is built.
    RELATIVE_FILES: ClassVar[tuple[str, ...]] = ()

    def _check(self, cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise FieldError(self.SECTION, key, msg)

    def _check_networks(self, entries: list[str], key: str) -> None:
        for i, entry in enumerate(entries):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise FieldError(self.SECTION, f"{key}[{i}]",
                                 f"is not an IP address or network: {entry!r}") from None

    def _check_port(self, port: int, key: str = "port") -> None:
        self._check(0 < port < 65536, key, f"must be 1-65535, got {port}")


def _is_ae_title(value: str) -> bool:
    return bool(_AE_RE.match(value))


@dataclass(frozen=True)
class NodeSettings(_Section):
    SECTION: ClassVar[str] = "node"

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

    def __post_init__(self) -> None:
        c = self._check
        c(_is_ae_title(self.ae_title.strip()), "ae_title",
          "must be 1-16 printable ASCII characters without backslash")
        self._check_port(self.port)
        for i, aet in enumerate(self.allowed_calling_aets):
            c(_is_ae_title(aet), f"allowed_calling_aets[{i}]", f"is not a valid AE title: {aet!r}")
        c(self.max_pdu_size == 0 or self.max_pdu_size >= 4096, "max_pdu_size",
          "must be 0 (unlimited) or at least 4096")
        c(self.max_associations >= 1, "max_associations", "must be at least 1")
        c(self.network_timeout > 0, "network_timeout", "must be positive")
        c(self.min_free_mb >= 0, "min_free_mb", "must not be negative")
        c(self.max_associations_per_ip >= 1, "max_associations_per_ip", "must be at least 1")
        c(self.max_associations_per_ae >= 1, "max_associations_per_ae", "must be at least 1")
        c(self.reserved_associations >= 0, "reserved_associations", "must not be negative")
        for i, entry in enumerate(self.trusted_peers):
            try:
                parse_trusted_peer(entry)
            except ValueError as exc:
                raise FieldError(self.SECTION, f"trusted_peers[{i}]", f"{entry!r}: {exc}"
                                 ) from None
        c(0 < self.acse_timeout <= 600, "acse_timeout", "must be between 0 and 600 s")
        c(0 < self.pdu_timeout <= self.network_timeout, "pdu_timeout",
          "must be positive and at most node.network_timeout")
        c(self.min_receive_rate_kib >= 0, "min_receive_rate_kib", "must not be negative")
        c(0 < self.shutdown_timeout <= 3600, "shutdown_timeout", "must be between 0 and 3600 s")
        self._check_networks(self.allowed_peer_ips, "allowed_peer_ips")


@dataclass(frozen=True)
class DatabaseSettings(_Section):
    SECTION: ClassVar[str] = "database"

    url: str = ""
    # "auto": apply the Alembic migrations at start-up; "off": refuse to start on a database
    # whose schema is older than this release (the admin runs `mammo-node db upgrade`).
    migrate: Literal["auto", "off"] = "auto"

    def __post_init__(self) -> None:
        self._check(self.migrate in ("auto", "off"), "migrate",
                    f"must be \"auto\" or \"off\", got {self.migrate!r}")


Role = Literal["receive", "analyse", "deliver"]
ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True)
class ClusterSettings(_Section):
    """Several nodes sharing one queue (node.cluster, node.queue)."""

    SECTION: ClassVar[str] = "cluster"

    node_name: str = ""  # unique per node; "" = "<host name>:<node.port>"
    roles: list[Role] = field(default_factory=lambda: list(ROLES))
    lease_seconds: float = 30
    heartbeat_seconds: float = 5

    def __post_init__(self) -> None:
        c = self._check
        c(bool(self.roles), "roles", "must name at least one role")
        for i, role in enumerate(self.roles):
            c(role in ROLES, f"roles[{i}]", f"must be one of {', '.join(ROLES)}, got {role!r}")
        c(len(self.node_name) <= 64, "node_name", "must be at most 64 characters")
        c(self.heartbeat_seconds > 0, "heartbeat_seconds", "must be positive")
        c(self.lease_seconds >= 2 * self.heartbeat_seconds, "lease_seconds",
          "must be at least twice cluster.heartbeat_seconds (a lease survives a missed "
          "heartbeat)")


def _default_other_sop_classes() -> list[str]:
    from node.intake import DEFAULT_OTHER_SOP_CLASSES

    return list(DEFAULT_OTHER_SOP_CLASSES)


_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class StudySettings(_Section):
    SECTION: ClassVar[str] = "study"

    stable_seconds: float = 30
    complete_on_four_views: bool = True
    check_interval_seconds: float = 2
    # Accepted with a study (0x0000) but never analysed (node.intake); see config.toml.
    other_sop_classes: list[str] = field(default_factory=_default_other_sop_classes)
    other_objects: Literal["discard", "keep"] = "discard"

    def __post_init__(self) -> None:
        from node.intake import ANALYSED_SOP_CLASSES

        c = self._check
        c(self.stable_seconds >= 0, "stable_seconds", "must not be negative")
        c(self.check_interval_seconds > 0, "check_interval_seconds", "must be positive")
        c(self.other_objects in ("discard", "keep"), "other_objects",
          f"must be \"discard\" or \"keep\", got {self.other_objects!r}")
        for i, uid in enumerate(self.other_sop_classes):
            key = f"other_sop_classes[{i}]"
            c(bool(_UID_RE.match(uid)) and len(uid) <= 64, key, f"is not a UID: {uid!r}")
            c(uid not in ANALYSED_SOP_CLASSES, key,
              f"{uid} is analysed by the node; it cannot also be listed as not analysed")
        c(len(set(self.other_sop_classes)) == len(self.other_sop_classes), "other_sop_classes",
          "lists a SOP class twice")


@dataclass(frozen=True)
class AnalysisSettings(_Section):
    SECTION: ClassVar[str] = "analysis"

    # FOR PROCESSING images: analysed (normalised first) or skipped. Checked here only: the
    # pipeline and node.analysis.prepare trust it.
    for_processing: Literal["analyse", "skip"] = "analyse"
    synthesized_2d: Literal["skip", "analyse"] = "skip"
    fallback_pixel_spacing_mm: float = 0.1
    sc_max_side: int = 2048
    detector_operating_point: Literal["card"] | float = "card"
    max_rois_per_image: int = 20
    # Bounds per study (node.worker) and on concurrent decoding (node.decode_limits).
    max_images_per_study: int = 16
    max_study_seconds: float = 600
    decode_memory_mb: int = 2048
    # Per-instance pre-analysis (node.preanalysis): threads, and images queued at most.
    preanalysis_workers: int = 2
    preanalysis_queue: int = 32

    def __post_init__(self) -> None:
        c = self._check
        c(self.for_processing in ("analyse", "skip"), "for_processing",
          f"must be \"analyse\" or \"skip\", got {self.for_processing!r}")
        c(self.synthesized_2d in ("analyse", "skip"), "synthesized_2d",
          f"must be \"analyse\" or \"skip\", got {self.synthesized_2d!r}")
        c(0.01 <= self.fallback_pixel_spacing_mm <= 1.0, "fallback_pixel_spacing_mm",
          "must be between 0.01 and 1.0 mm")
        c(256 <= self.sc_max_side <= 16384, "sc_max_side", "must be between 256 and 16384")
        op = self.detector_operating_point
        if isinstance(op, str):
            c(op == "card", "detector_operating_point",
              f"must be \"card\" or a cluster score in [0, 1], got {op!r}")
        else:
            c(0.0 <= op <= 1.0, "detector_operating_point",
              f"must be in [0, 1] (a cluster score), got {op}")
        c(1 <= self.max_rois_per_image <= 1000, "max_rois_per_image",
          "must be between 1 and 1000")
        c(1 <= self.max_images_per_study <= 10000, "max_images_per_study",
          "must be between 1 and 10000")
        c(self.max_study_seconds > 0, "max_study_seconds", "must be positive")
        c(self.decode_memory_mb >= 64, "decode_memory_mb", "must be at least 64")
        c(0 <= self.preanalysis_workers <= 64, "preanalysis_workers",
          "must be between 0 (off) and 64")
        c(1 <= self.preanalysis_queue <= 10000, "preanalysis_queue",
          "must be between 1 and 10000")

    @property
    def detector_operating_point_override(self) -> float | None:
        """The configured detector operating point, or None for the detector file's."""
        op = self.detector_operating_point
        return None if op == "card" else float(op)


@dataclass(frozen=True)
class LimitsSettings(_Section):
    """Declared image sizes accepted at C-STORE and before any decode (node.decode_limits)."""

    SECTION: ClassVar[str] = "limits"

    max_rows: int = 16384
    max_columns: int = 16384
    max_frames: int = 1000
    max_decoded_mb: int = 8192

    def __post_init__(self) -> None:
        for key, value in (("max_rows", self.max_rows), ("max_columns", self.max_columns)):
            self._check(1 <= value <= 65535, key, "must be between 1 and 65535")
        self._check(self.max_frames >= 1, "max_frames", "must be at least 1")
        self._check(self.max_decoded_mb >= 1, "max_decoded_mb", "must be at least 1")


#: The model card shipped with the node (inside the installed ``models`` package, next to its
#: weights): the default of ``[model] card`` wherever the configuration file lives.
SHIPPED_CARD_NAME = "models/weights/calc-cluster-lite0.json"
SHIPPED_CARD = Path(__file__).resolve().parents[1] / SHIPPED_CARD_NAME

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelSettings(_Section):
    SECTION: ClassVar[str] = "model"

    card: Path = SHIPPED_CARD
    architecture: str = "tf_efficientnet_lite0"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    batch_size: int = 16
    threshold: Literal["card"] | float = "card"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        c = self._check
        c(bool(_DEVICE_RE.match(self.device)), "device",
          f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        c(self.batch_size >= 1, "batch_size", "must be at least 1")
        c(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision",
          f"must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if isinstance(self.threshold, str):
            c(self.threshold == "card", "threshold", "must be \"card\" or a number in (0, 1)")
        else:
            c(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")
        c(bool(self.architecture), "architecture", "must not be empty")

    @property
    def threshold_override(self) -> float | None:
        return None if self.threshold == "card" else float(self.threshold)


OutputKind = Literal["tid1500", "mammo_cad", "gsps", "sc"]
# node.kinds.KINDS is the one list of output kinds; the Literal repeats it for the type checker,
# and importing this module fails if the two ever differ.
_OUTPUT_KINDS: tuple[OutputKind, ...] = get_args(OutputKind)
if tuple(KINDS) != _OUTPUT_KINDS:
    raise ImportError(f"config.OutputKind {_OUTPUT_KINDS} differs from node.kinds.KINDS {KINDS}")


def _objects_problem(objects: list[str]) -> tuple[str, str] | None:
    """(key suffix, message) of what is wrong with an ``objects`` list, None when it is fine."""
    if not objects:
        return "", f"must name at least one of {', '.join(_OUTPUT_KINDS)}"
    for i, kind in enumerate(objects):
        if kind not in _OUTPUT_KINDS:
            return (f"[{i}]", f"is not an output kind: {kind!r} "
                              f"(known: {', '.join(_OUTPUT_KINDS)})")
    if len(set(objects)) != len(objects):
        return "", "lists an output kind twice"
    return None


@dataclass(frozen=True)
class OutputSettings(_Section):
    SECTION: ClassVar[str] = "output"

    manufacturer: str = "mammo-node"
    sr_series_number: int = 9901
    sc_series_number: int = 9902
    # Output kinds (node.kinds): tid1500, mammo_cad, gsps, sc.
    objects: list[OutputKind] = field(default_factory=lambda: ["tid1500", "sc"])
    cad_operating_point: Literal["card"] | float = "card"
    cad_sr_series_number: int = 9903
    gsps_series_number: int = 9904

    def __post_init__(self) -> None:
        c = self._check
        problem = _objects_problem(list(self.objects))
        if problem:
            c(False, f"objects{problem[0]}", problem[1])
        op = self.cad_operating_point
        if isinstance(op, str):
            c(op == "card", "cad_operating_point",
              f"must be \"card\" or a number in [0, 1], got {op!r}")
        else:
            c(0.0 <= op <= 1.0, "cad_operating_point", f"must be in [0, 1], got {op}")
        # The one place series numbers are checked: each in range, and each output kind's
        # series its own (the report builders trust these).
        seen: dict[int, str] = {}
        for key, value in self.series_numbers.items():
            c(1 <= value < 2**31, key, "out of range")
            c(value not in seen, key, f"must differ from output.{seen.get(value)}")
            seen[value] = key

    @property
    def series_numbers(self) -> dict[str, int]:
        """Series number per key, in the order they are checked."""
        return {"sr_series_number": self.sr_series_number,
                "sc_series_number": self.sc_series_number,
                "cad_sr_series_number": self.cad_sr_series_number,
                "gsps_series_number": self.gsps_series_number}

    @property
    def cad_operating_point_override(self) -> float | None:
        """The CAD SR operating point, or None for the model card's threshold."""
        op = self.cad_operating_point
        return None if op == "card" else float(op)


@dataclass(frozen=True)
class DeliverySettings(_Section):
    SECTION: ClassVar[str] = "delivery"

    max_attempts: int = 6
    backoff_initial_seconds: float = 5
    backoff_max_seconds: float = 600

    def __post_init__(self) -> None:
        c = self._check
        c(self.max_attempts >= 1, "max_attempts", "must be at least 1")
        c(self.backoff_initial_seconds > 0, "backoff_initial_seconds", "must be positive")
        c(self.backoff_max_seconds >= self.backoff_initial_seconds, "backoff_max_seconds",
          "must be at least delivery.backoff_initial_seconds")


@dataclass(frozen=True)
class RetentionSettings(_Section):
    SECTION: ClassVar[str] = "retention"

    days: float = 30
    check_interval_hours: float = 6

    def __post_init__(self) -> None:
        self._check(self.days >= 0, "days", "must not be negative")
        self._check(self.check_interval_hours > 0, "check_interval_hours", "must be positive")


@dataclass(frozen=True)
class LogSettings(_Section):
    SECTION: ClassVar[str] = "log"

    level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR (any case)
    file: str = ""
    max_mb: float = 50
    backup_count: int = 10
    patient_identifiers: bool = False

    def __post_init__(self) -> None:
        self._check(self.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "level",
                    f"must be DEBUG, INFO, WARNING or ERROR, got {self.level!r}")
        self._check(self.max_mb > 0, "max_mb", "must be positive")
        self._check(self.backup_count >= 0, "backup_count", "must not be negative")


@dataclass(frozen=True)
class HttpSettings(_Section):
    SECTION: ClassVar[str] = "http"

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    recent_studies: int = 50
    refresh_seconds: int = 10
    request_timeout: float = 10
    idle_timeout: float = 5
    max_connections: int = 32

    def __post_init__(self) -> None:
        c = self._check
        c(bool(self.host), "host", "must not be empty")
        self._check_port(self.port)
        c(1 <= self.recent_studies <= 10000, "recent_studies", "must be between 1 and 10000")
        c(self.refresh_seconds >= 0, "refresh_seconds", "must not be negative")
        c(self.request_timeout > 0, "request_timeout", "must be positive")
        c(self.idle_timeout > 0, "idle_timeout", "must be positive")
        c(self.max_connections >= 1, "max_connections", "must be at least 1")


@dataclass(frozen=True)
class TLSSettings(_Section):
    """[tls]. Whether its files must exist depends on who uses TLS (this section's
    ``enabled`` or a destination's ``tls``): :meth:`Settings.__post_init__` checks that."""

    SECTION: ClassVar[str] = "tls"
    RELATIVE_FILES: ClassVar[tuple[str, ...]] = ("certificate", "private_key", "ca_certificates")

    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = True
    handshake_timeout_seconds: float = 10

    def __post_init__(self) -> None:
        self._check(self.handshake_timeout_seconds > 0, "handshake_timeout_seconds",
                    "must be positive")


Auth = Literal["none", "basic", "bearer"]


@dataclass(frozen=True)
class DicomwebSettings(_Section):
    """[dicomweb]: the STOW-RS receiver (node/stow.py). Off by default; checked only when on
    (as before: a disabled section is not read)."""

    SECTION: ClassVar[str] = "dicomweb"
    RELATIVE_FILES: ClassVar[tuple[str, ...]] = ("users_file", "tokens_file")

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8042
    auth: Auth = "basic"
    users_file: str = ""  # basic: lines "name:<hash from `mammo-node hash-secret`>"
    tokens_file: str = ""  # bearer: lines "<hash from `mammo-node hash-secret`>"
    tls: bool = False  # HTTPS with [tls] certificate/private_key
    max_request_mb: int = 2048
    timeout_seconds: float = 60
    allowed_peer_ips: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        c = self._check
        self._check_port(self.port)
        c(self.auth in ("none", "basic", "bearer"), "auth",
          f"must be \"basic\", \"bearer\" or \"none\", got {self.auth!r}")
        if self.auth == "basic":
            c(bool(self.users_file) and Path(self.users_file).is_file(), "users_file",
              "must name a file of \"name:hash\" lines (mammo-node hash-secret)")
        if self.auth == "bearer":
            c(bool(self.tokens_file) and Path(self.tokens_file).is_file(), "tokens_file",
              "must name a file of token hashes (mammo-node hash-secret)")
        if self.auth != "none" and not self.tls:
            c(_is_loopback(self.host), "tls",
              "must be true when credentials are accepted on a non-loopback address")
        c(1 <= self.max_request_mb <= 65536, "max_request_mb", "must be between 1 and 65536")
        c(self.timeout_seconds > 0, "timeout_seconds", "must be positive")
        self._check_networks(self.allowed_peer_ips, "allowed_peer_ips")


@dataclass(frozen=True)
class Destination(_Section):
    """One ``[[destinations]]`` entry; its messages say ``destinations[i].key`` when parsed."""

    SECTION: ClassVar[str] = "destination"
    RELATIVE_FILES: ClassVar[tuple[str, ...]] = ("password_file", "token_file",
                                                 "ca_certificates")

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    objects: list[OutputKind] | None = None  # None: [output] objects
    tls: bool = False
    # type = "dicomweb": STOW-RS to url (node/stow_client.py) instead of C-STORE.
    type: Literal["dicom", "dicomweb"] = "dicom"
    url: str = ""
    auth: Auth = "none"
    username: str = ""
    password_file: str = ""
    token_file: str = ""
    tls_verify: bool = True
    ca_certificates: str = ""  # PEM bundle that verifies the server; empty: the system's CAs
    timeout_seconds: float = 60

    def __post_init__(self) -> None:
        c = self._check
        c(bool(self.name), "name", f"must be non-empty and unique, got {self.name!r}")
        c(self.type in ("dicom", "dicomweb"), "type",
          f"must be \"dicom\" (C-STORE) or \"dicomweb\" (STOW-RS), got {self.type!r}")
        if self.type == "dicomweb":
            self._check_dicomweb()
        else:
            c(_is_ae_title(self.ae_title), "ae_title",
              f"is not a valid AE title: {self.ae_title!r}")
            c(bool(self.host), "host", "must not be empty")
            self._check_port(self.port)
        if self.objects is not None:
            problem = _objects_problem(list(self.objects))
            if problem:
                c(False, f"objects{problem[0]}", problem[1])

    def _check_dicomweb(self) -> None:
        from urllib.parse import urlsplit

        c = self._check
        url = urlsplit(self.url)
        c(url.scheme in ("http", "https") and bool(url.hostname), "url",
          f"must be an http:// or https:// DICOMweb root, got {self.url!r}")
        c(not url.username and not url.password, "url",
          "must not carry credentials (use auth, username and password_file)")
        c(self.auth in ("none", "basic", "bearer"), "auth",
          f"must be \"none\", \"basic\" or \"bearer\", got {self.auth!r}")
        c(self.timeout_seconds > 0, "timeout_seconds", "must be positive")
        if self.auth == "basic":
            c(bool(self.username), "username", "must be set for auth = \"basic\"")
            c(bool(self.password_file) and Path(self.password_file).is_file(), "password_file",
              "must name a file holding the password")
        if self.auth == "bearer":
            c(bool(self.token_file) and Path(self.token_file).is_file(), "token_file",
              "must name a file holding the token")
        if self.auth != "none":
            c(url.scheme == "https" or _is_loopback(url.hostname or ""), "url",
              "must be https:// when credentials are sent (plain http only to loopback)")
        if self.ca_certificates:
            c(Path(self.ca_certificates).is_file(), "ca_certificates",
              f"file {self.ca_certificates} does not exist")


@dataclass(frozen=True)
class Settings:
    """The whole configuration. The sections check themselves; this checks what relates two."""

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

    def __post_init__(self) -> None:
        self._check_tls_files()
        names: set[str] = set()
        for i, dest in enumerate(self.destinations):
            _check(dest.name not in names, f"destinations[{i}].name",
                   f"must be non-empty and unique, got {dest.name!r}")
            names.add(dest.name)
        w = self.dicomweb
        if w.enabled:
            _check(w.port != self.node.port, "dicomweb.port", "must differ from node.port")
            _check(not (self.http.enabled and w.port == self.http.port
                        and w.host == self.http.host), "dicomweb.port",
                   "must differ from http.port")
            if w.tls:
                _check(bool(self.tls.certificate) and bool(self.tls.private_key),
                       "dicomweb.tls", "needs tls.certificate and tls.private_key")

    def _check_tls_files(self) -> None:
        t = self.tls
        uses_tls = t.enabled or any(d.tls for d in self.destinations if d.type == "dicom")
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
            _check(not value or Path(value).is_file(), f"tls.{key}",
                   f"file {value} does not exist")

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.node.data_dir / 'node.sqlite3'}"

    @property
    def log_file(self) -> Path:
        return Path(self.log.file) if self.log.file else self.node.data_dir / "node.log"

    @property
    def detector_operating_point_override(self) -> float | None:
        """The configured detector operating point, or None for the detector file's."""
        return self.analysis.detector_operating_point_override

    @property
    def threshold_override(self) -> float | None:
        return self.model.threshold_override

    def objects_for(self, destination: Destination) -> list[str]:
        """The output kinds sent to ``destination``."""
        return list(self.output.objects if destination.objects is None else destination.objects)

    @property
    def report_kinds(self) -> list[str]:
        """The output kinds to build: every kind some destination wants ([output] objects
        when there is no destination, so that the results are kept)."""
        lists = [self.objects_for(d) for d in self.destinations] or [list(self.output.objects)]
        return [k for k in _OUTPUT_KINDS if any(k in x for x in lists)]

    @property
    def cad_operating_point_override(self) -> float | None:
        """The CAD SR operating point, or None for the model card's threshold."""
        return self.output.cad_operating_point_override


_SECTIONS: dict[str, type[_Section]] = {
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
        if name == "model":
            section = _shipped_card_fallback(section, base_dir)
        kwargs[name] = _build(cls, section, name, base_dir)
    dests = raw.get("destinations", [])
    if not isinstance(dests, list):
        raise ConfigError("destinations must be an array of tables ([[destinations]])")
    kwargs["destinations"] = [_build(Destination, d, f"destinations[{i}]", base_dir)
                              for i, d in enumerate(dests)]
    return Settings(**kwargs, source=source)


def _shipped_card_fallback(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``[model] card`` naming the shipped model works wherever the config file is.

    Relative paths are relative to the configuration file. The default configuration says
    ``card = "models/weights/calc-cluster-lite0.json"``: copied elsewhere (e.g.
    ``/etc/mammo-node/config.toml``) that path does not exist there, and the packaged card is
    meant, so it is used. Any other path, or that one when it does exist beside the config
    file, is taken as it is."""
    value = raw.get("card")
    if (isinstance(value, str) and Path(value).as_posix().removeprefix("./") == SHIPPED_CARD_NAME
            and not (base_dir / value).exists()):
        return {**raw, "card": str(SHIPPED_CARD)}
    return raw


def _build(cls: type[_Section], values: Any, prefix: str, base_dir: Path) -> Any:
    """``cls`` from one table: types coerced, relative files resolved, then the section's own
    checks (``__post_init__``), their messages prefixed with where the table is."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a table")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
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
    for name in cls.RELATIVE_FILES:
        if out.get(name):
            out[name] = str(base_dir / Path(out[name]).expanduser())
    try:
        return cls(**out)
    except FieldError as exc:
        raise ConfigError(f"{prefix}.{exc.field} {exc.detail}") from None


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
    if origin is Literal:
        # Only the type here (a string); which strings are allowed is the section's check,
        # next to its field, with the message that lists them.
        return _coerce(value, type(get_args(hint)[0]), key, base_dir)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", base_dir) for i, v in enumerate(value)]
    args = get_args(hint)
    if args:  # a union such as Literal["card"] | float: accept any member type
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
