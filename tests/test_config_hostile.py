"""The issue-14 configuration keys: validated with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.admission import Admission
from node.config import ConfigError, load_settings


@pytest.mark.parametrize(
    "text, key",
    [
        ("[node]\ntrusted_peers = ['PACS']\n", "node.trusted_peers[0]"),
        ("[node]\ntrusted_peers = ['PACS@10.0.0.300']\n", "node.trusted_peers[0]"),
        ("[node]\ntrusted_peers = ['*@*']\n", "node.trusted_peers[0]"),
        ("[node]\nmax_associations_per_ip = 0\n", "node.max_associations_per_ip"),
        ("[node]\nmax_associations_per_ae = 0\n", "node.max_associations_per_ae"),
        ("[node]\nreserved_associations = -1\n", "node.reserved_associations"),
        ("[node]\npdu_timeout = 120\n", "node.pdu_timeout"),
        ("[node]\nacse_timeout = 0\n", "node.acse_timeout"),
        ("[node]\nmin_receive_rate_kib = -1\n", "node.min_receive_rate_kib"),
        ("[node]\nshutdown_timeout = 0\n", "node.shutdown_timeout"),
        ("[limits]\nmax_rows = 0\n", "limits.max_rows"),
        ("[limits]\nmax_frames = 0\n", "limits.max_frames"),
        ("[limits]\nmax_decoded_mb = 0\n", "limits.max_decoded_mb"),
        ("[analysis]\nmax_images_per_study = 0\n", "analysis.max_images_per_study"),
        ("[analysis]\ndecode_memory_mb = 1\n", "analysis.decode_memory_mb"),
        ("[http]\nmax_connections = 0\n", "http.max_connections"),
        ("[http]\nrequest_timeout = 0\n", "http.request_timeout"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_settings(path)


def test_trusted_peer_forms() -> None:
    a = Admission(max_associations=1, reserved=1, per_ip=1, per_ae=1,
                  trusted_peers=["PACS@10.0.0.0/24", "*@10.1.1.1", "WS@*"])
    other = a.on_connect("10.5.5.5")  # the one general slot
    assert other is not None and a.on_request(other, "OTHER") is None
    u = a.on_connect("10.9.9.9")  # pool full, but "WS@*" might match: admitted to ask
    assert u is not None and a.on_request(u, "OTHER2") == "pool_full"
    a.release(u)
    t = a.on_connect("10.0.0.7")  # trusted by network: the reserve
    assert t is not None and a.on_request(t, "PACS") is None and t.trusted
    assert a.on_connect("10.1.1.1") is None  # capacity (1 + 1) reached, even for trusted
    a.release(other)
    w = a.on_connect("10.9.9.9")
    assert w is not None and a.on_request(w, "WS") is None and w.trusted  # AE-only trust
    a.release(t)
    a.release(w)
    assert a.open_count() == 0


def test_image_limits_table_matches_the_defaults() -> None:
    from node.config import LimitsSettings
    from tests.test_conformance import table

    rows = table("image-limits")
    assert len(rows) == 4
    for row in rows:
        key = row["Config key"].removeprefix("limits.")
        assert row["Default"] == str(getattr(LimitsSettings(), key)), row
