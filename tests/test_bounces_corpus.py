"""The parser against the shared corpus of real bounces, complaints and auto-replies,
labelled by Sisimai: the recipient, its hard/soft class and its reason."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.config import LimitsConfig
from relay.feedback import bounces

_REPO = Path(__file__).resolve().parent.parent
_CANDIDATES = (_REPO.parent / "shared" / "corpus" / "bounces",
               Path("/work/shared/corpus/bounces"))
LIMITS = LimitsConfig()
CORPUS = next((p for p in _CANDIDATES if (p / "expected.json").is_file()), None)


def score(corpus: Path) -> tuple[dict[str, float], list[tuple[str, str, Any, Any]]]:
    """The three shares over all expected recipients, and what was missed."""
    expected = json.loads((corpus / "expected.json").read_text("utf-8"))
    reports: dict[str, bounces.Report] = {}
    hits: Counter[str] = Counter()
    misses: list[tuple[str, str, Any, Any]] = []
    for row in expected:
        name = row["file"]
        if name not in reports:
            reports[name] = bounces.parse((corpus / name).read_bytes(),
                                          max_parts=LIMITS.max_report_parts,
                                          max_recipients=LIMITS.max_report_recipients)
        report = reports[name]
        want = (row["recipient"] or "").lower()
        if row["reason"] == "feedback":
            got = [r for r in report.recipients if r.address.lower() == want]
            ok_rcpt = bool(got) and report.type == "arf"
            ok_class = ok_rcpt
        elif row["reason"] == "vacation":
            got = list(report.recipients)
            ok_rcpt = ok_class = not report.is_bounce
        else:
            got = [r for r in report.recipients if r.address.lower() == want]
            ok_rcpt = bool(got)
            ok_class = ok_rcpt and (got[0].bounce_class == "hard") == row["hard_bounce"]
        ok_reason = bool(got) and got[0].reason == row["reason"]
        hits["recipient"] += ok_rcpt
        hits["recipient+class"] += ok_class
        hits["reason"] += ok_reason
        if not (ok_class and ok_reason):
            misses.append((name, want, (row["reason"], row["hard_bounce"], row["status"]),
                           [(r.address, r.reason, r.bounce_class, r.status) for r in
                            report.recipients] or report.type))
    return {k: hits[k] / len(expected) for k in ("recipient", "recipient+class", "reason")}, \
        misses


@pytest.mark.skipif(CORPUS is None, reason="the bounce corpus (../shared/corpus/bounces) "
                    "is not on this machine")
def test_corpus_shares() -> None:
    assert CORPUS is not None
    shares, misses = score(CORPUS)
    print("\nbounce corpus shares: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    assert shares["recipient+class"] >= 0.90, misses
    assert shares["reason"] >= 0.75, misses


if __name__ == "__main__":  # python tests/test_bounces_corpus.py: the shares and the misses
    assert CORPUS is not None
    found, missed = score(CORPUS)
    for miss in missed:
        print(*miss)
    print(found)
