"""Credentials for a fleet on one machine (tools/fleet_local.py, secure=True), made with `cryptography`
(a Flower dependency): a throw-away CA, the SuperLink's TLS certificate for 127.0.0.1 signed by it,
and one EC P-384 key pair per board in OpenSSH format (what `flower-supernode
--auth-supernode-private-key` and `flwr supernode register` read). A real fleet uses its own CA and
keys made once per board (`ssh-keygen -t ecdsa -b 384 -N "" -f board.key`)."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Dict, List

from taskedge.runtime.fsutil import atomic_write_bytes


def _name(cn: str):
    from cryptography.x509 import Name, NameAttribute
    from cryptography.x509.oid import NameOID
    return Name([NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key, fmt) -> bytes:
    from cryptography.hazmat.primitives import serialization as S
    return key.private_bytes(S.Encoding.PEM, fmt, S.NoEncryption())


def make(folder: Path, boards: int, host: str = "127.0.0.1") -> Dict[str, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization as S
    from cryptography.hazmat.primitives.asymmetric import ec
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer, issuer_key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=7)))
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True) if ca else \
            b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = cert("taskedge fleet CA (test)", ca_key, _name("taskedge fleet CA (test)"), ca_key, ca=True)
    out = {"ca": folder / "ca.pem", "cert": folder / "superlink.pem", "key": folder / "superlink.key"}
    atomic_write_bytes(out["ca"], ca.public_bytes(S.Encoding.PEM))
    atomic_write_bytes(out["cert"], cert(host, server_key, ca.subject, ca_key, ca=False).public_bytes(S.Encoding.PEM))
    atomic_write_bytes(out["key"], _pem_key(server_key, S.PrivateFormat.PKCS8))
    keys: List[tuple] = []
    for i in range(boards):
        k = ec.generate_private_key(ec.SECP384R1())
        priv, pub = folder / f"board{i}.key", folder / f"board{i}.key.pub"
        atomic_write_bytes(priv, _pem_key(k, S.PrivateFormat.OpenSSH))
        atomic_write_bytes(pub, k.public_key().public_bytes(S.Encoding.OpenSSH, S.PublicFormat.OpenSSH))
        keys.append((priv, pub))
    out["boards"] = keys
    return out
