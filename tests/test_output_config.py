"""[output] objects / cad_operating_point / series numbers and [[destinations]] objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_settings
from node.kinds import (
    KINDS,
    SOP_CLASS_OF_KIND,
    check_kinds,
    kind_of,
    sop_classes_for,
    union_of_kinds,
)
from tests.netutil import REPO

DEST = 'name = "{name}"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_settings(path)


def test_defaults() -> None:
    s = load_settings(REPO / "config.toml")
    assert s.output.objects == ["tid1500", "sc"]
    assert s.output.cad_operating_point == "card" and s.cad_operating_point_override is None
    assert (s.output.cad_sr_series_number, s.output.gsps_series_number) == (9903, 9904)
    assert s.report_kinds == ["tid1500", "sc"]


def test_per_destination_objects_and_union(tmp_path: Path) -> None:
    s = load(tmp_path, '[output]\nobjects = ["tid1500"]\ncad_operating_point = 0.4\n'
             '[[destinations]]\n' + DEST.format(name="pacs") +
             '[[destinations]]\n' + DEST.format(name="mammo") + 'objects = ["gsps", "mammo_cad"]\n')
    pacs, mammo = s.destinations
    assert s.objects_for(pacs) == ["tid1500"]
    assert s.objects_for(mammo) == ["gsps", "mammo_cad"]
    assert s.report_kinds == ["tid1500", "mammo_cad", "gsps"]  # canonical order, no sc
    assert s.cad_operating_point_override == pytest.approx(0.4)


def test_no_destination_builds_output_objects(tmp_path: Path) -> None:
    s = load(tmp_path, '[output]\nobjects = ["mammo_cad", "sc"]\n')
    assert s.report_kinds == ["mammo_cad", "sc"]


@pytest.mark.parametrize("text, key, words", [
    ('[output]\nobjects = ["tid1500", "pdf"]\n', "output.objects[1]", "not an output kind"),
    ('[output]\nobjects = []\n', "output.objects", "at least one"),
    ('[output]\nobjects = ["sc", "sc"]\n', "output.objects", "twice"),
    ('[output]\nobjects = "sc"\n', "output.objects", "must be a list"),
    ('[output]\ncad_operating_point = 1.5\n', "output.cad_operating_point", "[0, 1]"),
    ('[output]\ncad_operating_point = "high"\n', "output.cad_operating_point", "card"),
    ('[output]\ngsps_series_number = 9901\n', "output.gsps_series_number", "must differ"),
    ('[output]\ncad_sr_series_number = 0\n', "output.cad_sr_series_number", "out of range"),
    ('[[destinations]]\n' + DEST.format(name="d") + 'objects = ["gsps", "seg"]\n',
     "destinations[0].objects[1]", "not an output kind"),
    ('[[destinations]]\n' + DEST.format(name="d") + 'objects = []\n',
     "destinations[0].objects", "at least one"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    message = str(err.value)
    assert key in message and words in message, message


def test_kinds_registry() -> None:
    assert KINDS == ("tid1500", "mammo_cad", "gsps", "sc")
    assert sop_classes_for(["mammo_cad", "gsps"]) == {"1.2.840.10008.5.1.4.1.1.88.50",
                                                       "1.2.840.10008.5.1.4.1.1.11.1"}
    assert all(kind_of(uid) == kind for kind, uid in SOP_CLASS_OF_KIND.items())
    assert kind_of("1.2.3") is None
    assert check_kinds(["sc", "tid1500"]) == ("tid1500", "sc")
    assert union_of_kinds([["sc"], ["gsps", "sc"]]) == ("gsps", "sc")
    with pytest.raises(ValueError, match="unknown output kind"):
        check_kinds(["x"])
    with pytest.raises(TypeError):
        check_kinds("sc")
