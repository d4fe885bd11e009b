"""DKIM private keys (RFC 6376, RFC 8463): read from what users and APIs give (PEM, base64
DER, an Ed25519 seed), checked usable (RSA >= 1024 bits, or Ed25519), and written out (the
private PEM, the DNS record's p=). Used where keys arrive (submit, `relay domains`) and where
they sign (delivery.dkim)."""

from __future__ import annotations

import base64

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


class KeyError_(ValueError):
    """A private key that cannot be read or is not RSA (>= 1024 bits) or Ed25519."""


def load_private_key(data: bytes | str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    """A PEM key (PKCS#1 or PKCS#8, RSA or Ed25519), the same key as base64 DER, or an
    Ed25519 seed in base64 as dkimpy and `openssl` users write it."""
    raw = data.encode() if isinstance(data, str) else data
    raw = raw.strip()
    if raw.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyError_(f"not a readable unencrypted PEM private key ({exc})") from None
        return _usable(key)
    try:
        decoded = base64.b64decode(b"".join(raw.split()), validate=True)
    except ValueError:
        raise KeyError_(_UNREADABLE) from None
    if len(decoded) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(decoded)
    try:  # a DER key in base64, as MailChannels' docs make it (openssl rsa -outform der)
        key = serialization.load_der_private_key(decoded, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyError_(_UNREADABLE) from None
    return _usable(key)


_UNREADABLE = ("not a PEM private key, a base64 DER private key nor a base64 Ed25519 seed "
               "(32 octets)")


def _usable(key: object) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise KeyError_(f"an RSA key of {key.key_size} bits is too short "
                            "(RFC 8301 requires at least 1024)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise KeyError_("the key is neither RSA nor Ed25519")


def private_pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The p= of the DNS record: SubjectPublicKeyInfo for RSA, the raw 32 octets for Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    else:
        raw = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode()


def record_text(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    kind = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={kind}; p={public_value(key)}"
