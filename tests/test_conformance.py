"""docs/conformance-statement.md is true to the running node.

SCP: every SOP class × transfer syntax (the documented ones plus some that must be refused) is
proposed to a node process, each as its own presentation context; what the node accepts must be
exactly the documented tables. SCU: a recording pynetdicom SCP stands as the node's destination
and captures the presentation contexts the node proposes when it delivers a real result (and for
``mammo-node echo --destination``); they must be exactly the documented tables. The codes of the
delivered SR and the association defaults are checked against the document too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from node.config import NodeSettings
from tests.netutil import REPO, NodeProcess, free_port, storescu, wait_until
from tests.testdata import mias_to_mg

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

DOC = REPO / "docs" / "conformance-statement.md"
# Proposed to the node besides the documented ones: it must refuse them.
EXTRA_SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.2",        # CT Image Storage
                     "1.2.840.10008.5.1.4.1.1.4",        # MR Image Storage
                     "1.2.840.10008.5.1.4.1.1.481.3"]    # RT Structure Set Storage
EXTRA_SYNTAXES = ["1.2.840.10008.1.2.4.100",   # MPEG2 Main Profile
                  "1.2.840.10008.1.2.4.80"]    # (documented for storage; refused for echo)


def table(name: str) -> list[dict[str, str]]:
    """The markdown table after ``<!-- table: name -->``, as rows of header -> cell text."""
    text = DOC.read_text(encoding="utf-8")
    marker = f"<!-- table: {name} -->"
    assert text.count(marker) == 1, f"{marker} missing or repeated"
    lines = text.split(marker, 1)[1].strip().splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    assert rows[1][0].startswith("---")
    return [dict(zip(header, r, strict=True)) for r in body]


def documented_scp() -> set[tuple[str, str]]:
    syntaxes = table("scp-transfer-syntaxes")
    out = set()
    for sop in table("scp-sop-classes"):
        column = "Verification" if sop["SOP Class"] == "Verification" else "Storage"
        out |= {(sop["SOP Class UID"], ts["UID"]) for ts in syntaxes if ts[column] == "yes"}
    for sop in table("scp-other-sop-classes"):
        out |= {(sop["SOP Class UID"], ts["UID"]) for ts in syntaxes
                if ts["Not analysed"] == "yes"}
    return out


def test_documented_other_sop_classes_are_the_default() -> None:
    from node.intake import DEFAULT_OTHER_SOP_CLASSES

    assert [r["SOP Class UID"] for r in table("scp-other-sop-classes")] == \
        list(DEFAULT_OTHER_SOP_CLASSES)


def documented_scu() -> set[tuple[str, str]]:
    return {(sop["SOP Class UID"], ts["UID"]) for sop in table("scu-sop-classes")
            for ts in table("scu-transfer-syntaxes")}


class RecordingSCP:
    """A destination that accepts everything and remembers what was proposed to it."""

    def __init__(self, ae_title: str = "RECORDER") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.proposed: list[tuple[str, tuple[str, ...]]] = []
        self.received: list[Dataset] = []
        self.lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self.server = None

    def _on_requested(self, ev: evt.Event) -> None:
        with self.lock:
            self.proposed += [(str(cx.abstract_syntax), tuple(map(str, cx.transfer_syntax)))
                              for cx in ev.assoc.requestor.requested_contexts]

    def _on_store(self, ev: evt.Event) -> int:
        ds = ev.dataset
        ds.file_meta = ev.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def start(self) -> RecordingSCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_ACCEPTED, self._on_requested), (evt.EVT_C_STORE,
                                                                  self._on_store),
                          (evt.EVT_C_ECHO, lambda ev: 0x0000)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess,
                                                                        RecordingSCP]]:
    tmp = tmp_path_factory.mktemp("conformance")
    recorder = RecordingSCP().start()
    # Every output kind, so that every documented SCU SOP class is really proposed.
    node = NodeProcess(tmp / "node", [{"name": "rec", "ae_title": recorder.ae_title,
                                       "host": "127.0.0.1", "port": recorder.port,
                                       "objects": ["tid1500", "sc", "mammo_cad", "gsps"]}]
                       ).start()
    try:
        yield node, recorder
    finally:
        node.stop()
        recorder.stop()


def test_scp_accepts_exactly_the_documented_contexts(running) -> None:  # type: ignore[no-untyped-def]
    node, _ = running
    expected = documented_scp()
    sop_classes = sorted({s for s, _ in expected} | set(EXTRA_SOP_CLASSES))
    syntaxes = sorted({t for _, t in expected} | set(EXTRA_SYNTAXES))
    pairs = [(s, t) for s in sop_classes for t in syntaxes]
    accepted: set[tuple[str, str]] = set()
    for start in range(0, len(pairs), 128):  # at most 128 contexts per association
        ae = AE(ae_title="CONFORMANCE")
        for sop, ts in pairs[start:start + 128]:
            ae.add_requested_context(sop, [ts])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MAMMO_AI")
        if not assoc.is_established:  # every context of this chunk refused
            assert assoc.is_rejected or assoc.is_aborted
            continue
        try:
            accepted |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in assoc.accepted_contexts}
            max_pdu = assoc.acceptor.maximum_length
        finally:
            assoc.release()
    assert accepted - expected == set(), "accepted but not in the conformance statement"
    assert expected - accepted == set(), "documented but refused by the node"
    assert max_pdu == NodeSettings().max_pdu_size


def test_association_policy_defaults_are_the_documented_ones() -> None:
    defaults = NodeSettings()
    for row in table("association-policies"):
        key = row["Config key"].removeprefix("node.")
        value = getattr(defaults, key)
        shown = "[]" if value == [] else str(value)
        assert row["Default"] == shown, f"{row['Config key']}: document {row['Default']}, " \
                                        f"code {shown}"


def _sr_codes(ds: Dataset) -> Iterator[tuple[str, str]]:
    for item in ds.get("ContentSequence", []):
        for code in item.get("ConceptCodeSequence", []):
            yield str(code.CodeValue), str(code.CodingSchemeDesignator)
        if item.get("ValueType") == "NUM":  # by-reference items have no value type
            name = item.ConceptNameCodeSequence[0]
            yield str(name.CodeValue), str(name.CodingSchemeDesignator)
        yield from _sr_codes(item)


def test_scu_proposes_exactly_the_documented_contexts_and_sr_codes(  # type: ignore[no-untyped-def]
        running, tmp_path: Path) -> None:
    node, recorder = running
    src = tmp_path / "mdb209.dcm"
    ds = mias_to_mg("mdb209")
    # Section 7: results keep the source's character set and its non-ASCII names.
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    ds.save_as(src, enforce_file_format=True)
    assert storescu(node.port, [src], calling="MODALITY").returncode == 0
    # One image: TID 1500 SR + CAD SR + SC + GSPS.
    wait_until(lambda: len(recorder.received) >= 4, 400, 1.0,
               "SR, CAD SR, SC and GSPS at the recorder")
    echo = node.cli("echo", "--destination", "rec")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    with recorder.lock:
        proposed = {(sop, ts) for sop, syntaxes in recorder.proposed for ts in syntaxes}
        received = list(recorder.received)
    assert proposed == documented_scu()
    # The codes of both SRs are all listed in the statement's SR content tables.
    doc = DOC.read_text(encoding="utf-8")
    srs = [ds for ds in received if ds.Modality == "SR"]
    assert sorted(ds.SOPClassUID for ds in srs) == ["1.2.840.10008.5.1.4.1.1.88.33",
                                                    "1.2.840.10008.5.1.4.1.1.88.50"]
    sr = next(ds for ds in srs if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33")
    for report in srs:
        codes = {c for c in _sr_codes(report) if c[1] not in ("UCUM", "RFC5646", "ISO3166_1")}
        assert codes, "no codes found in the SR"
        missing = sorted(c for c in codes if f"({c[0]}, {c[1]})" not in doc)
        assert not missing, f"SR codes not in the conformance statement: {missing}"
    sc = [ds for ds in received if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert sc and all(ds.ConversionType == "WSD" and ds.BurnedInAnnotation == "YES"
                      for ds in sc)
    for result in received:
        assert result.SpecificCharacterSet == "ISO_IR 192"
        assert str(result.PatientName) == "Müller^Jürgen"
    assert pydicom.uid.UID(sr.file_meta.TransferSyntaxUID) in {
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}


def test_wrong_called_ae_title_is_rejected_permanently(running) -> None:  # type: ignore[no-untyped-def]
    node, _ = running
    ae = AE(ae_title="CONFORMANCE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NOT_THE_NODE")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # Result 1 = rejected-permanent, source 1 = service user, reason 7 = called AE not recognised
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
    assert "called AE title" in DOC.read_text(encoding="utf-8")
