"""[dicomweb] and DICOMweb destinations: safe defaults, and a clear error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, parse_settings
from node.secrets import hash_password, hash_token, read_users, verify


def _parse(tmp_path: Path, **raw: object):  # type: ignore[no-untyped-def]
    return parse_settings(raw, base_dir=tmp_path)


def test_defaults_are_off_and_dicom(tmp_path: Path) -> None:
    s = _parse(tmp_path, destinations=[{"name": "p", "ae_title": "P", "host": "h", "port": 1}])
    assert s.dicomweb.enabled is False and s.dicomweb.auth == "basic"
    assert s.dicomweb.host == "127.0.0.1"
    assert s.destinations[0].type == "dicom" and s.destinations[0].tls_verify is True


@pytest.mark.parametrize("dest, key", [
    ({"type": "dicomweb", "url": "ftp://x"}, "destinations[0].url"),
    ({"type": "dicomweb", "url": "https://u:p@x/dicom-web"}, "destinations[0].url"),
    ({"type": "dicomweb", "url": "https://x", "auth": "digest"}, "destinations[0].auth"),
    ({"type": "dicomweb", "url": "https://x", "auth": "basic"}, "destinations[0].username"),
    ({"type": "dicomweb", "url": "https://x", "auth": "basic", "username": "u",
      "password_file": "missing"}, "destinations[0].password_file"),
    ({"type": "dicomweb", "url": "https://x", "auth": "bearer"}, "destinations[0].token_file"),
    ({"type": "dicomweb", "url": "http://pacs.example.org", "auth": "bearer",
      "token_file": "tok"}, "destinations[0].url"),  # credentials in clear over the network
    ({"type": "stow", "url": "https://x"}, "destinations[0].type"),
    ({"type": "dicom", "url": "https://x"}, "destinations[0].ae_title"),
])
def test_bad_dicomweb_destinations(tmp_path: Path, dest: dict, key: str) -> None:
    (tmp_path / "tok").write_text("t")
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _parse(tmp_path, destinations=[{"name": "d", **dest}])


def test_good_dicomweb_destination_resolves_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret")
    s = _parse(tmp_path, destinations=[{"name": "d", "type": "dicomweb",
                                        "url": "https://pacs/dicom-web", "auth": "basic",
                                        "username": "u", "password_file": "pw"}])
    assert s.destinations[0].password_file == str(tmp_path / "pw")
    # plain http to loopback with credentials is allowed (a local proxy or a test peer)
    _parse(tmp_path, destinations=[{"name": "d", "type": "dicomweb", "url": "http://127.0.0.1:1",
                                    "auth": "basic", "username": "u", "password_file": "pw"}])


@pytest.mark.parametrize("section, key", [
    ({"enabled": True}, "dicomweb.users_file"),
    ({"enabled": True, "auth": "bearer"}, "dicomweb.tokens_file"),
    ({"enabled": True, "auth": "none", "port": 11112}, "dicomweb.port"),
    ({"enabled": True, "auth": "basic", "users_file": "users", "host": "0.0.0.0"},
     "dicomweb.tls"),
    ({"enabled": True, "auth": "none", "tls": True}, "dicomweb.tls"),
    ({"enabled": True, "auth": "none", "max_request_mb": 0}, "dicomweb.max_request_mb"),
    ({"enabled": True, "auth": "none", "allowed_peer_ips": ["nope"]},
     r"dicomweb.allowed_peer_ips\[0\]"),
])
def test_bad_dicomweb_receiver(tmp_path: Path, section: dict, key: str) -> None:
    (tmp_path / "users").write_text("a:" + hash_password("p", 1000) + "\n")
    with pytest.raises(ConfigError, match=key):
        _parse(tmp_path, dicomweb=section)


def test_hashed_secrets(tmp_path: Path) -> None:
    stored = hash_password("correct horse", iterations=1000)
    assert verify("correct horse", stored) and not verify("wrong", stored)
    assert verify("tok", hash_token("tok")) and not verify("tok2", hash_token("tok"))
    assert not verify("x", "garbage") and not verify("x", "pbkdf2_sha256$x$y$z")
    (tmp_path / "u").write_text(f"# readers\nalice:{stored}\n\n")
    assert read_users(tmp_path / "u") == {"alice": stored}
