#!/usr/bin/env python3
"""CPU seconds `bounces.parse` spends on hostile inbound reports (issue 17).

The inputs are the tests' (tests/test_bounces.py): a DSN of 8,000 delivery-status parts
(1.3 MB), one delivery-status part naming 8,000 recipients, a 400 KB folded Content-Type
header (the stdlib parses its parameters in quadratic time), and a 36 MB text bounce (the
default max_message_size). Run against another tree's code to compare:

    python bench/report_parse.py
    PYTHONPATH=/path/to/old/src:. python bench/report_parse.py   # parse(raw) without limits
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the tests' input makers

from relay.config import LimitsConfig
from relay.feedback import bounces
from tests.test_bounces import many_part_dsn, many_recipient_dsn  # noqa: E402

LIMITS = LimitsConfig()
WITH_LIMITS = "max_parts" in inspect.signature(bounces.parse).parameters


def parse(raw: bytes) -> bounces.Report:
    if WITH_LIMITS:
        return bounces.parse(raw, max_parts=LIMITS.max_report_parts,
                             max_recipients=LIMITS.max_report_recipients)
    return bounces.parse(raw)  # type: ignore[call-arg]  # the code before issue 17


def inputs() -> list[tuple[str, bytes]]:
    header = (b"From: MAILER-DAEMON@mx.example.org\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/report; x=\"" + b";\r\n " * 100_000 +
              b"\"; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n")
    big = (b"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n"
           b"To: a@relay.test\r\n\r\nuser@example.org: no such user\r\n" +
           (b"y" * 70 + b"\r\n") * 500_000)
    return [("8,000-part DSN", many_part_dsn(8000)),
            ("8,000-recipient part", many_recipient_dsn(8000)),
            ("400 KB Content-Type", header),
            ("36 MB text bounce", big)]


def main() -> None:
    logging.disable(logging.CRITICAL)  # flufl.bounce logs its detectors' failures
    for name, raw in inputs():
        started = time.process_time()
        report = parse(raw)
        spent = time.process_time() - started
        print(f"{name:22} {len(raw) / 1e6:6.2f} MB {spent:7.2f} s CPU "
              f"{len(report.recipients):5} recipients")


if __name__ == "__main__":
    main()
