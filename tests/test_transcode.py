"""transcode.seven_bit and needs_smtputf8: 7-bit clean bodies, short lines, content unchanged."""

from __future__ import annotations

import base64
import email
import re
from email.message import Message
from email.policy import compat32

import pytest

from relay.delivery import transcode

HEAD = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: s\r\n"
BINARY = bytes(b for b in range(1, 256) if b not in (10, 13)) + b"\r\n" + bytes(range(128, 256))


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=compat32)


def child(part: Message, index: int) -> Message:
    sub = part.get_payload(index)
    assert isinstance(sub, Message)
    return sub


def leaves(data: bytes) -> list[Message]:
    return [part for part in parse(data).walk() if not part.is_multipart()]


def assert_same_content(before: bytes, after: bytes) -> None:
    old, new = leaves(before), leaves(after)
    assert len(old) == len(new)
    for a, b in zip(old, new, strict=True):
        assert b.get_payload(decode=True) == a.get_payload(decode=True)


def assert_clean(out: bytes) -> None:
    assert out.isascii()
    lines = out.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert b"\r" not in b"".join(lines) and b"\n" not in b"".join(lines)


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def unfold(data: bytes) -> bytes:
    return re.sub(rb"\r\n(?=[ \t])", b"", data)


def test_ascii_message_is_returned_as_the_same_object() -> None:
    data = HEAD + b"MIME-Version: 1.0\r\n\r\n" + b"a line of text\r\n" * 400
    assert transcode.seven_bit(data) is data
    assert transcode.seven_bit(b"") == b""


def test_8bit_utf8_text_becomes_quoted_printable() -> None:
    body = "Grüße, café, naïve — 日本語\r\n".encode() * 20 + b"trailing space \r\nend"
    data = (HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)
    out = transcode.seven_bit(data)
    assert_clean(out)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert max(len(line) for line in out.split(b"\r\n\r\n", 1)[1].split(b"\r\n")) <= 76
    message = parse(out)
    assert message.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert message["Content-Type"] == "text/plain; charset=utf-8"
    assert message.get_payload(decode=True) == body


def test_a_1200_octet_ascii_line_is_reencoded() -> None:
    body = b"x" * 600 + b" = " + b"y" * 597 + b"\r\nshort\r\n"
    data = HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + body
    out = transcode.seven_bit(data)
    assert_clean(out)
    message = parse(out)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message["Content-Type"] == "text/plain"  # no charset given, none added
    assert message.get_payload(decode=True) == body


def test_long_base64_line_is_rewrapped() -> None:
    content = bytes(range(256)) * 5
    data = (HEAD + b"MIME-Version: 1.0\r\nContent-Type: application/pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(content) + b"\r\n")
    out = transcode.seven_bit(data)
    assert_clean(out)
    assert parse(out).get_payload(decode=True) == content


MIXED = (HEAD + b"MIME-Version: 1.0\r\n"
         b'Content-Type: multipart/mixed; boundary="=_b1"\r\n'
         b"Content-Transfer-Encoding: 8bit\r\n"
         b"\r\nThis is a multi-part message in MIME format.\r\n"
         b"--=_b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
         b"\r\nBonjour \xc3\xa0 tous\r\nligne = deux\r\n"
         b"--=_b1\r\nContent-Type: text/html; charset=\"iso-8859-1\"\r\n"
         b"Content-Transfer-Encoding: 8bit\r\n\r\n<p>caf\xe9</p>\r\n"
         b"--=_b1\r\nContent-Type: application/octet-stream\r\n"
         b'Content-Disposition: attachment; filename="x.bin"\r\n'
         b"Content-Transfer-Encoding: binary\r\n\r\n" + BINARY + b"\r\n"
         b"--=_b1\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n"
         b"--=_b1--\r\nepilogue\r\n")


def test_multipart_parts_are_each_reencoded() -> None:
    out = transcode.seven_bit(MIXED)
    assert_clean(out)
    assert b"\r\n\r\nThis is a multi-part message in MIME format.\r\n--=_b1\r\n" in out
    assert out.endswith(b"--=_b1--\r\nepilogue\r\n")
    assert header_block(out).startswith(header_block(MIXED).replace(b"8bit", b"7bit"))
    message = parse(out)
    assert message.get_boundary() == "=_b1"
    assert message["Content-Transfer-Encoding"] == "7bit"
    assert [p.get_all("Content-Transfer-Encoding") for p in leaves(out)] == [
        ["quoted-printable"], ["quoted-printable"], ["base64"], None]
    assert [p["Content-Type"] for p in leaves(out)] == [
        "text/plain; charset=utf-8", 'text/html; charset="iso-8859-1"',
        "application/octet-stream", "text/plain"]
    assert_same_content(MIXED, out)
    assert leaves(out)[2].get_payload(decode=True) == BINARY
    assert b"--=_b1\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n--=_b1--" in out


def test_nested_message_rfc822_with_8bit_body() -> None:
    inner = (b"From: x@y.test\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: text/plain; charset=iso-8859-1\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9 \xe0 Paris\r\n")
    plain_inner = b"From: x@y.test\r\nSubject: old\r\n\r\nna\xc3\xafve\r\n"
    data = (HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b2\r\n\r\n"
            b"--b2\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--b2\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + inner + b"--b2\r\nContent-Type: message/rfc822\r\n\r\n" + plain_inner
            + b"--b2--\r\n")
    out = transcode.seven_bit(data)
    assert_clean(out)
    assert_same_content(data, out)
    wrapper, wrapper2 = [p for p in parse(out).walk() if p.get_content_type() == "message/rfc822"]
    assert wrapper["Content-Transfer-Encoding"] == "7bit"
    assert child(wrapper, 0)["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"From: x@y.test\r\nSubject: inner\r\n" in out
    added = child(wrapper2, 0)
    assert added["MIME-Version"] == "1.0"
    assert added["Content-Type"] == 'text/plain; charset="utf-8"'
    assert added.get_payload(decode=True) == b"na\xc3\xafve"  # its CRLF is the boundary's


def test_a_1500_octet_header_line_is_folded() -> None:
    value = " ".join(f"<part{i}.{i * 7}@example.test>" for i in range(60))
    assert len(value) > 1500
    data = HEAD + f"References: {value}\r\n".encode() + b"\r\nhi\r\n"
    out = transcode.seven_bit(data)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert out.count(b"\r\n") > data.count(b"\r\n")
    assert unfold(out) == data
    assert parse(out)["References"].replace("\r\n", "") == value


def test_long_header_lines_fold_in_the_slow_path_too() -> None:
    words = "\u00e9t\u00e9 " * 400  # 8-bit header text, left as it is
    data = (HEAD + f"X-Long: {words}end\r\n".encode() + b"X-Nospace: " + b"z" * 1200
            + b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b3\r\n\r\n"
            b"--b3\r\nContent-Type: text/plain; charset=utf-8\r\nX-Part: " + b"w " * 600
            + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9\r\n--b3--\r\n")
    out = transcode.seven_bit(data)
    long_lines = [line for line in out.split(b"\r\n") if len(line) > 998]
    assert long_lines == [b" " + b"z" * 1200]  # folded after the colon, no further
    assert unfold(header_block(out)) == unfold(header_block(data))
    assert child(parse(out), 0)["X-Part"].replace("\r\n", "") == "w " * 600
    assert_same_content(data, out)


def test_non_mime_8bit_message_gets_mime_headers() -> None:
    body = "Hej då, smörgås\r\n".encode()
    out = transcode.seven_bit(HEAD + b"\r\n" + body)
    assert_clean(out)
    message = parse(out)
    assert message["MIME-Version"] == "1.0"
    assert message["Content-Type"] == 'text/plain; charset="utf-8"'
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_payload(decode=True) == body
    assert header_block(out).startswith(HEAD.rstrip(b"\r\n"))

    latin = transcode.seven_bit(HEAD + b"\r\nsm\xf6rg\xe5s\r\n")
    assert parse(latin)["Content-Type"] == 'text/plain; charset="unknown-8bit"'
    assert parse(latin).get_payload(decode=True) == b"sm\xf6rg\xe5s\r\n"


def test_non_mime_ascii_message_with_a_long_line_gets_mime_headers() -> None:
    body = b"q" * 1200 + b"\r\n"
    out = transcode.seven_bit(HEAD + b"\r\n" + body)
    assert_clean(out)
    message = parse(out)
    assert message["MIME-Version"] == "1.0"
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_payload(decode=True) == body


def test_untouched_headers_stay_byte_for_byte_in_the_slow_path() -> None:
    headers = (b"Received: from mx.example.test (mx.example.test [192.0.2.1])\r\n"
               b"\tby relay.test (Postfix) with ESMTPS id 4AbC;\r\n"
               b"\tMon,  1 Jan 2024 00:00:00 +0000 (UTC)\r\n"
               b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;\r\n"
               b"\t s=sel; t=1700000000; h=from:to:subject;\r\n"
               b"\t bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
               b"\t b=AbCdEf\r\n\t GhIjKl==\r\n"
               b"ARC-Seal:\r\n\ti=1; a=rsa-sha256; cv=none\r\n"
               b"Subject:no space\r\nX-Spaces:   three  \r\nX-Formfeed: a\x0cb\r\n"
               b"X-Utf8: d\xc3\xa9j\xc3\xa0 vu\r\nX-Empty:\r\n" + HEAD +
               b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n")
    data = headers + b"Content-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9\r\n"
    out = transcode.seven_bit(data)
    assert out.startswith(headers + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")
    assert out.split(b"\r\n\r\n", 1)[1] == b"=C3=A9\r\n"
    assert transcode.needs_smtputf8(out)


def test_duplicate_cte_headers_become_one() -> None:
    data = (HEAD + b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: 8bit\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            b"\r\n\xc3\xa9\r\n")
    out = transcode.seven_bit(data)
    assert parse(out).get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert parse(out).get_payload(decode=True) == b"\xc3\xa9\r\n"


def test_a_message_the_email_package_cannot_take_goes_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes) -> Message:
        raise ValueError("cannot parse")
    monkeypatch.setattr(transcode._PARSER, "parsebytes", broken)
    data = HEAD + b"\r\n\xc3\xa9\r\n"
    assert transcode.seven_bit(data) is data


def test_needs_smtputf8() -> None:
    assert transcode.needs_smtputf8("From: a@b.test\r\nSubject: \u00e9\r\n\r\nx\r\n".encode())
    assert transcode.needs_smtputf8("From: j\u00f6rg@b.test\r\n".encode())
    assert not transcode.needs_smtputf8("From: a@b.test\r\nSubject: e\r\n\r\n\u00e9\r\n".encode())
    assert not transcode.needs_smtputf8("\r\nSubject: \u00e9\r\n".encode())
    assert not transcode.needs_smtputf8(b"")
