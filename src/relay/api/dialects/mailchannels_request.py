"""The MailChannels send request (seed 000): its shape, the checks of its settings, what a
personalization's content and headers become, and the octets the whole request expands
into, counted before any message is built."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from html import escape as html_escape
from typing import Annotated, Any, Literal

import orjson
import pystache
import pystache.parser
from pydantic import Field, StrictBool, StringConstraints

from ...types import Composition, Stream
from ..errors import ApiError
from ..parts import checked_headers
from ..schemas import RESERVED_HEADERS, AddressObject, Strict

MAX_PERSONALIZATIONS = 1000
# the headers MailChannels' `headers` may not set (seed 000), beside relay's own list
RESERVED = frozenset({
    "authentication-results", "bcc", "cc", "content-transfer-encoding", "content-type",
    "dkim-signature", "from", "message-id", "received", "reply-to", "subject", "to",
}) | RESERVED_HEADERS

HeaderMap = dict[Annotated[str, StringConstraints(min_length=1, max_length=76)], str]
Selector = Annotated[str, StringConstraints(min_length=1, max_length=63,
                                            pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")]
DomainName = Annotated[str, StringConstraints(min_length=1, max_length=253)]


class McToggle(Strict):
    enable: StrictBool = False
    custom_domain_name: str | None = None


class McTracking(Strict):
    click_tracking: McToggle | None = None
    open_tracking: McToggle | None = None


class McUnsubscribe(Strict):
    custom_domain_name: str | None = None


class McContent(Strict):
    type: str
    value: str
    template_type: Literal["mustache"] | None = None


class McAttachment(Strict):
    content: str
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255,
                                               pattern=r"^[^\r\n/\\]*$")]
    type: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")] | None = None
    disposition: Literal["attachment", "inline"] = "attachment"
    content_id: Annotated[str, StringConstraints(
        min_length=1, max_length=200, pattern=r"^[^\s<>\"]+$")] | None = None


class McDkim(Strict):
    dkim_domain: DomainName | None = None
    dkim_selector: Selector | None = None
    dkim_private_key: Annotated[str, StringConstraints(min_length=1)] | None = None


class McPersonalization(McDkim):
    to: list[AddressObject] = Field(min_length=1, max_length=1000)
    cc: list[AddressObject] = Field(default_factory=list, max_length=1000)
    bcc: list[AddressObject] = Field(default_factory=list, max_length=1000)
    subject: Annotated[str, StringConstraints(max_length=998)] | None = None
    from_: AddressObject | None = Field(default=None, alias="from")
    reply_to: AddressObject | None = None
    envelope_from: AddressObject | None = None
    headers: HeaderMap = Field(default_factory=dict)
    dynamic_template_data: dict[str, Any] = Field(default_factory=dict)
    substitutions: dict[str, str] | None = None


class McSend(McDkim):
    personalizations: list[McPersonalization] = Field(min_length=1,
                                                      max_length=MAX_PERSONALIZATIONS)
    from_: AddressObject = Field(alias="from")
    subject: Annotated[str, StringConstraints(max_length=998)] | None = None
    content: list[McContent] = Field(min_length=1, max_length=2)
    reply_to: AddressObject | None = None
    envelope_from: AddressObject | None = None
    headers: HeaderMap = Field(default_factory=dict)
    attachments: list[McAttachment] = Field(default_factory=list, max_length=100)
    transactional: StrictBool = True
    campaign_id: str | None = None
    tracking_settings: McTracking | None = None
    unsubscribe_settings: McUnsubscribe | None = None


class McValidate(Strict):
    """POST /webhook/validate's body (optional): the request id the test event carries."""

    request_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None


def check_settings(m: McSend) -> None:
    tracking = m.tracking_settings
    for name in ("click_tracking", "open_tracking"):
        toggle = getattr(tracking, name) if tracking else None
        if toggle is not None and toggle.custom_domain_name:
            raise ApiError(400, "relay's tracking links use its [api] public_url; a custom "
                           "tracking domain is not supported",
                           param=f"tracking_settings.{name}.custom_domain_name")
    if m.unsubscribe_settings is not None and m.unsubscribe_settings.custom_domain_name:
        raise ApiError(400, "relay's unsubscribe links use its [api] public_url; a custom "
                       "unsubscribe domain is not supported",
                       param="unsubscribe_settings.custom_domain_name")
    for i, p in enumerate(m.personalizations):
        if p.substitutions:
            raise ApiError(400, "substitutions are not supported: use a mustache template "
                           "and dynamic_template_data", param=f"personalizations[{i}].substitutions")


def campaign_id(value: str) -> str:
    if len(value) > 48:
        raise ApiError(400, f"campaign_id is {len(value)} characters; at most 48",
                       param="campaign_id")
    if not value or any(c.isspace() for c in value):
        raise ApiError(400, "campaign_id must not be empty or contain spaces",
                       param="campaign_id")
    return value


def filled_content(content: list[McContent], data: Mapping[str, Any], *, limit: int
                   ) -> tuple[str | None, str | None]:
    """text and html, mustache filled in with `data`; what one template may write is held
    to `limit` octets (max_request_expansion), since sections and variables multiply."""
    found: dict[str, str] = {}
    for i, c in enumerate(content):
        kind = c.type.split(";")[0].strip().lower()
        if kind not in ("text/plain", "text/html"):
            raise ApiError(400, f"content type {c.type!r}: text/plain or text/html",
                           param=f"content[{i}].type")
        if kind in found:
            raise ApiError(400, f"more than one {kind} content", param=f"content[{i}].type")
        value = c.value
        if c.template_type == "mustache":
            value = _mustache(value, data, html=kind == "text/html", param=f"content[{i}]",
                              limit=limit)
        found[kind] = value
    return found.get("text/plain"), found.get("text/html")


class _OverBudget(Exception):
    pass


class _Budget:
    """Octets a template may still write. Sections over lists nest (50 items, 6 deep, is
    50**6 passes) and a variable can be inserted many times, so what a render costs is
    counted as it goes, and it stops at the limit instead of filling memory."""

    def __init__(self, octets: int) -> None:
        self.left = octets

    def spend(self, octets: int) -> None:
        self.left -= octets
        if self.left < 0:
            raise _OverBudget


class _Text(str):
    """A string of the data; str() of it (how pystache inserts it unescaped) is counted."""

    budget: _Budget

    def __str__(self) -> str:
        self.budget.spend(len(self))
        return str.__str__(self)


class _List(list[Any]):
    """A list of the data; each pass of a section over it is counted as the whole template
    written once more (the most a pass can write besides the variables, counted apart)."""

    budget: _Budget
    cost: int

    def __iter__(self) -> Iterator[Any]:
        for item in list.__iter__(self):
            self.budget.spend(self.cost)
            yield item


class _Renderer(pystache.Renderer):  # type: ignore[misc]
    def __init__(self, budget: _Budget, *, html: bool) -> None:
        # partials={}: pystache would otherwise read {{>name}} from the filesystem (any
        # readable *.mustache, /abs/path and ../ included); a request has no partials
        super().__init__(escape=self._escape, missing_tags="ignore", partials={})
        self._budget = budget
        self._html = html

    def _escape(self, value: str) -> str:
        self._budget.spend(len(value))
        return html_escape(value, quote=True) if self._html else str.__str__(value)

    def str_coerce(self, val: Any) -> str:
        """Numbers, lists and objects inserted as text (pystache's documented hook)."""
        text = str(val)
        self._budget.spend(len(text))
        return text


def _counted(value: Any, budget: _Budget, cost: int) -> Any:
    if isinstance(value, str):
        text = _Text(value)
        text.budget = budget
        return text
    if isinstance(value, list):
        items = _List(_counted(v, budget, cost) for v in value)
        items.budget, items.cost = budget, cost
        return items
    if isinstance(value, dict):
        return {k: _counted(v, budget, cost) for k, v in value.items()}
    return value


def _mustache(template: str, data: Mapping[str, Any], *, html: bool, param: str,
              limit: int) -> str:
    budget = _Budget(limit)
    renderer = _Renderer(budget, html=html)
    try:
        return str.__str__(renderer.render(template, _counted(dict(data), budget,
                                                             max(1, len(template)))))
    except pystache.parser.ParsingError as exc:
        raise ApiError(400, f"{param}: not a valid mustache template ({exc})",
                       param=f"{param}.value") from None
    except _OverBudget:
        raise ApiError(413, f"{param}: the template would write more than {limit} octets "
                       "([limits] max_request_expansion)", param=f"{param}.value") from None


def merged_headers(root: Mapping[str, str], own: Mapping[str, str], where: str,
                   stream: Stream) -> tuple[tuple[str, str], ...]:
    """The root's headers with the personalization's beating them, names compared without
    case; the reserved ones refused."""
    merged: dict[str, tuple[str, str, str]] = {}
    for source, headers in (("headers", root), (f"{where}.headers", own)):
        for name, value in headers.items():
            if name.lower() in RESERVED:
                raise ApiError(400, f"the {name} header is reserved; it cannot be set in "
                               "headers", param=f"{source}.{name}")
            merged[name.lower()] = (name, value, source)
    out: list[tuple[str, str]] = []
    for name, value, source in merged.values():
        out += checked_headers([(name, value)], stream, param=source)
    return tuple(out)


def expansion(m: McSend) -> int:
    """About how many octets the request's messages come to, from the request alone: each
    personalization is its own message with the content, its template data (what mustache
    can fill in), the headers and every attachment (decoded: 3/4 of its base64)."""
    files = sum(len(a.content) * 3 // 4 for a in m.attachments)
    shared = files + sum(len(c.value) for c in m.content) + _json_size(m.headers)
    mustache = any(c.template_type == "mustache" for c in m.content)
    return sum(shared + _json_size(p.headers)
               + (_json_size(p.dynamic_template_data) if mustache else 0)
               for p in m.personalizations)


def built_octets(c: Composition) -> int:
    """What `expansion` estimated, counted on a built composition: mustache has filled it."""
    return (sum(len(x) for x in (c.text, c.html) if x) + sum(len(a.content) for a in c.attachments)
            + sum(len(n) + len(v) + 6 for n, v in c.headers))


def check_expansion(octets: int, limit: int, *, built: bool = False) -> None:
    """413 past [limits] max_request_expansion, naming personalizations: the field that
    multiplies the rest."""
    if octets > limit:
        what = "the messages built so far come" if built else "its messages would come"
        raise ApiError(413, f"personalizations: {what} to about {octets} octets; this "
                       f"server expands one request into at most {limit} "
                       "([limits] max_request_expansion): send fewer personalizations per "
                       "request", param="personalizations")


def _json_size(value: Any) -> int:
    return len(orjson.dumps(value)) if value else 0
