"""The enhanced status codes (RFC 3463) of relay's SMTP replies: aiosmtpd writes many of
its replies without one; the protocol adds them as each reply goes out."""

from __future__ import annotations

import functools
import re

# Enhanced status codes (RFC 3463) for the replies aiosmtpd writes without one.
_ENHANCED_BY_CODE = {
    "421": "4.7.0", "451": "4.3.0", "452": "4.5.3",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3", "554": "5.7.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b")
_REPLY = re.compile(r"^([245]\d\d)([ -])(.*)$", re.DOTALL)


@functools.lru_cache(maxsize=256)  # most replies are a few fixed strings
def with_enhanced(status: str) -> str:
    """Add an enhanced status code to a reply that has none (not to greetings or 354/334)."""
    if status in ("250 OK", "221 Bye"):
        return status[:4] + "2.0.0 " + status[4:]
    if _HAS_ENHANCED.match(status):
        return status
    m = _REPLY.match(status)
    if not m or m.group(1) not in _ENHANCED_BY_CODE or m.group(2) == "-":
        return status
    code, _, text = m.groups()
    if status.startswith("552 Error: Too much mail data") or "exceeds fixed maximum" in status:
        text = "Message too big for system"
    return f"{code} {_ENHANCED_BY_CODE[code]} {text}"
