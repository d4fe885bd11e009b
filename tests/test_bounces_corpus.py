"""The parser against the shared corpus of real bounces, complaints and auto-replies,
labelled by Sisimai: the recipient, its hard/soft class and its reason.

The corpus is split by sample file into a development part and a held-out part (~30 %, by a
hash of the file name, so all recipients of a file fall on one side): rules are tuned on
the development part only, and the held-out part says how they do on bounces they were
not tuned on.  `python tests/test_bounces_corpus.py` prints the shares of each part and the
development misses (`--all` prints the held-out misses too); `python
tests/test_bounces_corpus.py --all DIR` scores another set laid out the same way."""

from __future__ import annotations

import hashlib
import json
import sys
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
SHARES = ("recipient", "recipient+class", "reason")
Miss = tuple[str, str, Any, Any]


def held_out(name: str) -> bool:
    """Whether a sample file is in the held-out part: 3 in 10, by a hash of its name."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10 < 3


def part_of(name: str) -> str:
    return "held-out" if held_out(name) else "dev"


def score(corpus: Path) -> tuple[dict[str, dict[str, float]], dict[str, list[Miss]]]:
    """The three shares for each part ("dev", "held-out", "all") and what each missed."""
    expected = json.loads((corpus / "expected.json").read_text("utf-8"))
    reports: dict[str, bounces.Report] = {}
    hits: dict[str, Counter[str]] = {p: Counter() for p in ("dev", "held-out", "all")}
    counts: Counter[str] = Counter()
    misses: dict[str, list[Miss]] = {"dev": [], "held-out": [], "all": []}
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
        for part in (part_of(name), "all"):
            counts[part] += 1
            hits[part]["recipient"] += ok_rcpt
            hits[part]["recipient+class"] += ok_class
            hits[part]["reason"] += ok_reason
            if not (ok_class and ok_reason):
                misses[part].append((name, want, (row["reason"], row["hard_bounce"],
                                                  row["status"]),
                                     [(r.address, r.reason, r.bounce_class, r.status)
                                      for r in report.recipients] or report.type))
    shares = {part: {k: hits[part][k] / counts[part] for k in SHARES} for part in hits}
    return shares, misses


def _summary(shares: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"{part:>8}: " + ", ".join(f"{k} {v:.1%}" for k, v in got.items())
                     for part, got in shares.items())


@pytest.mark.skipif(CORPUS is None, reason="the bounce corpus (../shared/corpus/bounces) "
                    "is not on this machine")
def test_corpus_shares() -> None:
    assert CORPUS is not None
    shares, misses = score(CORPUS)
    print("\nbounce corpus shares:\n" + _summary(shares))
    # what the rules reach, less a recipient or two (the held-out part has 112 recipients)
    assert shares["all"]["recipient+class"] >= 0.97, misses["all"]
    assert shares["all"]["reason"] >= 0.91, misses["all"]
    assert shares["held-out"]["recipient+class"] >= 0.97, misses["held-out"]
    assert shares["held-out"]["reason"] >= 0.91, misses["held-out"]


if __name__ == "__main__":  # python tests/test_bounces_corpus.py [--all] [DIR]
    # DIR: another labelled set in the same layout (its expected.json beside its samples)
    named = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    assert named or CORPUS is not None
    found, missed = score(named[0] if named else CORPUS)
    for miss in missed["all" if "--all" in sys.argv else "dev"]:
        print(*miss)
    print(_summary(found))
