"""The words of a bounce that say what went wrong: phrases, most specific first, each naming a
reason of bounce_reasons' vocabulary.  Read whatever the status code says: many servers send
5.0.0 or 5.7.1 for everything, and the sentence is then the fact; bounce_reasons decides when
a code or the SMTP stage outranks them."""

from __future__ import annotations

import functools
import re

_PHRASES: tuple[tuple[str, str], ...] = (
    ("notcompliantrfc", r"\brfc ?(2822|5322|5321|1123)\b|not (rfc|standards).{0,10}compliant"
                        r"|duplicate (header|message-id)|multiple \w+ headers"
                        r"|multiple .{0,20}addresses in from"),
    ("norelaying", r"relay(ing)? (access )?(denied|not (permitted|allowed))|unable to relay"
                   r"|not permitted to relay|no relaying|relay not permitted|not a gateway"
                   r"|relaying (mail )?to .{1,80} (is )?not allowed|not configured to relay"
                   r"|insecure mail relay|we do not relay|not allowed to relay"
                   # qmail's "sorry, that domain isn't in my list of allowed rcpthosts"
                   r"|allowed rcpthosts?"
                   # MessageLabs' and others' "you are trying to use me [...] as a relay"
                   r"|use (me|us|this (server|host|system))\b.{0,60}\bas a relay"
                   r"|credentials for relay"),
    # a local program that failed, not a report's "This is the Haraka Mailer program"
    ("mailererror", r"procmail|pipe to \||x-unix|local delivery failed"
                    r"|mail(er)? program (error|fail|exit|return|died|crash)"),
    # the reporter's own MX set-up (Postfix: "mail for example.org loops back to myself"),
    # not the network's: a routing loop it will not leave by trying again
    ("systemerror", r"loops back to myself|loop was found in the mail exchanger"
                    # Exim's words for the same ("lowest numbered MX record points to local
                    # host")
                    r"|mx record points to local host"
                    # the remote's own trouble: a directory with two entries for one name
                    # (Domino's "not unique. Several matches found"), a failure in processing
                    r"|several matches found|encountered an error while being processed"),
    # a destination's TLS policy not met (RFC 8460's DANE, DNSSEC and MTA-STS failures)
    ("securityerror", r"\b(dnssec|dane|mta-sts)\b"),
    ("userunknown", r"recipient address rejected: access denied"),
    # cPanel's Exim, of a destination it could not route to: "The account or domain may not
    # exist, they may be blacklisted, or missing the proper dns entries."
    ("hostunknown", r"the account or domain may not exist"),
    ("userunknown", r"(account|mailbox|address|recipient|user)( or domain)? (may|does) not exist"),
    ("userunknown", r"\bI cannot deliver mail for\b"),  # Haraka's, at RCPT TO
    ("rejected", r"sender.{0,30}(was |is )?(rejected|denied|refused)|purported responsible address"
                 r"|\bfrom:? (domain |address )?(is )?(invalid|not valid)"
                 # the sender on a list of refused ones, not the client's IP address
                 r"|envelope sender|badmailfrom|(blocked|banned) senders?\b|envelope blocked"
                 r"|sender (envelope )?address .{0,40}black ?listed"
                 # Exim's callout to the sender's domain ("Verification failed for <ann@x>
                 # / Unrouteable address / Sender verify failed"): the sender's address
                 # that does not route, not the recipient's
                 r"|sender verif(y|ication) failed"
                 # RFC 7505 4.2's "Sender address has null MX": of the sender's domain
                 r"|sender (address |domain )?(has|with) (an? )?null mx"
                 # a recipient (a group, a mailbox) that takes mail from known senders only
                 r"|sender (was |is )?not authenticated"
                 # Haraka's "That sender cannot send mail here", "No MX for your FROM address"
                 r"|sender (cannot|can.?t|may not|is not allowed to) send"
                 r"|sender (is )?(in|on) (my|the|our) black ?list|null sender is not allowed"
                 r"|sender is (a )?spammer"
                 r"|\byour (from|mail from|sender|envelope sender) (address|domain)\b"
                 r"|your (e-?mail )?(address|domain) (has been |is )(blocked|black ?listed)"),
    ("filtered", r"recipient preferences"),
    # a limit on the header's size is the header's (sendmail's "Headers too large (4000
    # max)", Courier's "Message header size exceeds policy limit"), not the message's size
    ("contenterror", r"\bheaders? (size )?(too (large|long|big)|exceeds?)"
                     r"|\bheader size\b.{0,30}\bexceeds?"),
    # a kind of attachment the receiver refuses, not a malformed one
    ("policyviolation", r"content presents a potential|illegal attachment"
                        r"|do not accept messages containing"
                        # a list or group that takes mail from its members only
                        r"|members-only list|closed (mailing )?list|organizational settings"),
    # too many recipients in a span of time is a sending rate, not one message's count
    ("speeding", r"too many (messages|mails|recipients) (this|per|an?|in the last) "
                 r"(\d+ )?(second|minute|hour|day)"),
    # a quota of mail per hour or day, over which the rest is refused (Sisimai: toomanyconn)
    ("toomanyconn", r"(exceeded|over|reached) (the |its |your )?(max(imum)?|limit)( number)?"
                    r"( of)? (e-?mails|messages|mails|recipients) (per|an?|each) "
                    r"(second|minute|hour|day)|daily message quota exceeded"),
    ("toomanyconn", r"too many (smtp )?(connections|sessions|simultaneous|concurrent|recipients)"
                    r"|connection (rate|limit)|frequency limit|too many errors from your ip"
                    r"|trop de connexions|maximum sending rate"
                    r"|(messages?|mails?|recipients?) per (connection|session)"
                    r"|(exceeded|reached) the max(imum)? number of connections"),
    ("virusdetected", r"virus|malware|infected|trojan"),
    # a spam filter's verdict, before the checks its advice names ("spf, HELO, PTR")
    ("spamdetected", r"(failed|failing|did not pass) .{0,30}\b(anti-?)?spam (checks?|tests?"
                     r"|filters?)"),
    ("requireptr", r"reverse (dns|lookup|hostname)|\bptr\b|rdns|no (dns|host ?name) for"
                   r"|(ip|client).{0,40}(not|cannot be|could not be) resolved|unverif[iy]able"
                   r"|cannot find your (reverse )?hostname|hostname.{0,20}(lookup|resolve)"
                   r"|(ip|host) ?name lookup failed|unresolvable relay host ?name"),
    ("spamdetected", r"(spam|junk) (classification|score|content)|classified as (spam|junk)"
                     r"|blacklisted (url|link|domain in)|\buribl\b|surbl"),
    # the client's address may not send for the sender's domain ("192.0.2.1 is not allowed
    # to send mail from example.org"): a block of the client, as Sisimai reads it
    ("blocked", r"\bis not allowed to send mail from\b(?!.{0,200}\bspf\b)"),
    ("authfailure", r"\bspf\b|\bdkim\b|\bdmarc\b|sender policy framework"
                    r"|authenticat(ion|ed).{0,30}fail|not authenticated"
                    # the message, not the SMTP client, failed authentication (SPF, DKIM)
                    r"|unauthenticated (e-?mail|mail|messages?)\b"),
    ("suspend", r"(recipient|user|mailbox|destination)(.s)? (e-?mail )?account (is |has been )?"
                r"(blocked|disabled|suspended|deactivated|inactive|frozen|locked)"),
    ("suspend", r"\b(inactive|disabled|deactivated|suspended) (e-?mail )?(address|account|mailbox)"
                r"|\btemporarily inactive\b"),
    # a server that takes no mail from this sender: the sender refused, not the recipient's
    # domain closed to all mail
    ("rejected", r"(does not|doesn.?t) accept (e-?)?mail from\b"),
    ("badreputation", r"reputation|(ip|sender).{0,20}(has been )?temporarily (deferred|rate)"
                      r"|user complaints"),
    # the reporter's own try to connect that the remote's TCP refused ("connect to
    # mx.example.org[192.0.2.7]:25: Connection refused", "[Errno 111] Connection refused",
    # Go's "dial tcp 192.0.2.7:25: connect: connection refused"): nothing listening there,
    # not a refusal of this client by a server that answered
    ("networkerror", r"\bconnect to \S{1,300}: connection (refused|reset|timed out)"
                     r"|\berrno \d+\]? connection refused"
                     r"|\bconnect: connection (refused|reset|timed out)"),
    ("blocked", r"black ?list|block ?list|\bdnsbl|\brbl\b|spamhaus|spamcop|sorbs|barracuda"
                r"|messages from \d{1,3}(\.\d{1,3}){3} (weren.?t|were not|are not|will not be)"
                r" (sent|accepted)"
                r"|(ip|address|host|connection|client).{0,40}(blocked|banned|denied|refused)"
                r"|blocked.{0,20}(ip|address|host)|access denied|poor reputation"
                r"|client host rejected|invalid ip|not accepting connections"
                r"|not allowed to connect|banned (sending )?ip|forbidden by your ip"
                # the client's sending of spam, not a verdict on this message
                r"|(currently )?sending spam|looks (suspiciously )?like (a )?spammer"
                r"|have been sent from (the following |this |your )?ip"
                # the name the client gave in HELO refused ("550 HELO host name invalid",
                # "HELO/EHLO argument is invalid")
                r"|\b(he|eh)lo\b.{0,30}\b(invalid|not valid|not allowed|rejected|refused|denied"
                r"|forged|not (a )?fully qualified|not resolv)|(invalid|bad|forged|bogus) (he|eh)lo"
                # sendmail's dnsbl: "Rejected: 192.0.2.7 listed at bl.example.net"
                r"|\d{1,3}(\.\d{1,3}){3}\]? (is )?listed (at|in|on|by)\b"
                r"|(smtp|mail) server of your isp|dynamic ip|dial-?up|residential ip"),
    # a filter's verdict named in one CamelCase token ("MCSpamSignature", "SpamAssassin"):
    # a spam finding, whatever generic words ("security policies") the refusal wraps it in
    ("spamdetected", r"(?-i:Spam[A-Z][a-z])"),  # searched: any letters may come before
    # ("bulk email senders" are whom a provider's rules are for, not a verdict on this mail)
    # GTUBE, the Generic Test for Unsolicited Bulk Email every spam filter knows (rspamd's
    # "554 5.7.1 Gtube pattern")
    ("spamdetected", r"\bspam(?!haus|cop)|junk mail|unsolicited|bulk (e-?)?mail(?! senders?)"
                     r"|\bgtube\b"
                     r"|mass mail"
                     r"|content.{0,20}rejected"
                     r"|message (has been |was )?(classified|identified|considered|marked) as"),
    # a mailbox that holds too many messages is full (not a sender sending too many)
    ("mailboxfull", r"too many (messages|mails) (on|in) (the |this |your )?(server|mail ?box|account)"
                    r"|(user|mailbox|account) has too many (messages|mails)"),
    ("speeding", r"rate limit|too many (messages|mails)|sending too (fast|much)|too quickly"
                 r"|excessive (volume|rate)"
                 r"|try again later.{0,20}(too|rate)|exceeded .{0,20}rate|at a rate"),
    # RFC 821's own 552 text, "Requested mail action aborted: exceeded storage allocation"
    ("mailboxfull", r"exceeded storage allocation|space has been used up"),
    ("mailboxfull", r"(mailbox|mail box|inbox|mail ?folder|account|user|storage)"
                    r".{0,40}(full|quota|exceed|over)|quota|insufficient storage"
                    r"|not enough (storage|space)|full mailbox|mailbox size limit"),
    ("mesgtoobig", r"(message|mail|size).{0,30}(too (big|large|long)|exceed(s|ed)?.{0,20}"
                   r"(size|limit))|exceeds? .{0,30}(size limit|maximum (message )?size)"
                   r"|message size|size limit"),
    ("systemfull", r"(system|disk|server).{0,20}(full|out of space)|insufficient (system|disk)"),
    ("exceedlimit", r"exceed(s|ed)? .{0,30}limit"),
    # (a "misconfigured forwarding address" is the system's trouble, not a mailbox that moved)
    ("hasmoved", r"has moved|moved to|no longer (valid|available) at"
                 r"|(?<!misconfigured )forwarding address"),
    # whole words: "address(es) failed: an undisclosed address" closed nothing
    ("suspend", r"(account|mailbox|user|address).{0,40}\b(disabled|suspended|inactive"
                r"|deactivated|expired|locked|frozen|not active|blocked|closed|terminated)\b"
                r"|suspended"
                r"|inactive user|archived recipient|temporar(il)?y locked"),
    ("notaccept", r"no smtp service|(does not|doesn.?t) (accept|receive) (e-?)?mail|null mx"
                  r"|accepts no mail|(couldn.?t|could not|unable to) find (a |any )?mail exchanger"
                  r"|no mx (records? )?(found )?for"),
    # no way to the host for now, not a host that is not there: Exim's router found no route
    # to the domain, the kernel none to its address, Exchange no DNS records for it
    ("networkerror", r"unrouteable mail domain|no route to host"
                     r"|dns records for the destination .{0,20}could not be found"),
    ("networkerror", r"not found, try again|temporary (dns|lookup)|host not reachable"
                     r"|dns (query|lookup) failed|host name lookup failure"
                     r"|(unexpected|malformed) name server reply"),
    ("hostunknown", r"host (or domain name )?(not found|unknown)|unknown host|domain"
                    r" (not found|does not exist|unknown|is not valid)|unknown domain"
                    r"|no such (domain|host)|name or service not known|host not found"
                    r"|nxdomain|domain name not found|unrouteable (mail )?domain"
                    r"|unrouteable address|no mx|bad destination host"
                    r"|mail domain mentioned in (the )?e-?mail address is unknown"
                    r"|unresolvable|domain (is )?not reachable"
                    r"|\bhost [\w\-]+(\.[\w\-]+)+ not found"
                    # qmail's "Sorry, I couldn't find any host by that name."
                    r"|(couldn.?t|could not|unable to) find any host (named|by that name)"),
    ("userunknown", r"(user|recipient|rcpt|mailbox|address|account|addressee|destination)"
                    r".{0,50}(unknown|not (found|exist|known|valid|listed|recogni[sz]ed)"
                    r"|does( not|n.?t)"
                    r" exist|doesn.?t have|invalid|no such|unavailable"
                    r"|(couldn.?t|could not|can ?not) be found)"
                    r"|no such (user|recipient|mailbox|address|account|person)"
                    r"|is not a known (user|recipient|address)|no mail ?box (found|available)"
                    r"|unknown (user|recipient|local|mailbox|address|alias|addressee)"
                    r"|invalid[ -](recipient|mailbox|address|user)|mailbox not found"
                    r"|(user|recipient) doesn.?t|not our customer|no mailbox here"
                    r"|unrouteable|not a valid (user|mailbox|recipient)"
                    r"|invalid .{0,20}userid|illegal user|permanent failure in user lookup"
                    r"|no valid recipients|recipient rejected|bad recipient"
                    r"|undeliverable address|user not found|no account by that name"
                    r"|not present in (the )?directory|not an active (address|user|mailbox)"
                    r"|mail ?box not present|recipient (is )?not (local|ok)|no one at this address"
                    r"|no (mail ?box|user) by that name|unknown virtual user|missing home directory"
                    # Exchange's "RESOLVER.ADR.RecipientNotFound" / "RecipNotFound"
                    r"|resolver\.adr\.recip(ient)? ?not ?found"
                    r"|can.?t accept user|address is wrong or no longer valid"
                    r"|utilisateur inconnu|no existe (dicha persona|ese usuario)|nessun utente"),
    # the same in the languages servers answer in besides English (German, French, Spanish,
    # Portuguese, Italian, Dutch, Polish, Russian), where the code is a generic 5.0.0
    ("userunknown", r"\b(benutzer|empf.nger|adressat)( ist)? unbekannt|unbekannte[rn]? "
                    r"(benutzer|empf.nger|adresse)|destinataire inconnu|adresse (e-?mail )?"
                    r"(inconnue|inexistante)|(usuario|destinatario) (desconocido|inexistente)"
                    r"|usu.rio (desconhecido|inexistente)|destinat.rio desconhecido"
                    r"|utente (sconosciuto|inesistente)"
                    r"|onbekende (gebruiker|ontvanger|geadresseerde)"
                    r"|nieznany (u.ytkownik|adresat|odbiorca)"
                    r"|нет такого (пользователя|ящика|адреса)"
                    r"|(benutzer|empf.nger|adresse|postfach|mailbox|utilisateur|destinataire"
                    r"|bo.te|usuario|destinatario|buz.n|cuenta|direcci.n|usu.rio|conta"
                    r"|endere.o|utente|indirizzo|casella|gebruiker|adres|u.ytkownik|skrzynka"
                    r"|odbiorc[ay]|пользовател\w{0,6}|адрес\w{0,6}|ящик\w{0,6})\b.{0,40}"
                    r"(existiert nicht"
                    r"|n.existe (pas|plus)|no existe|n.o existe|non esiste|bestaat niet"
                    r"|nie istnieje|не (найден\w{0,6}|существует))"),
    ("mailboxfull", r"\b(postfach|mailbox|bo.te (aux lettres|mail|de r.ception|du destinataire)"
                    r"|buz.n"
                    r"|caixa (postal|de (correio|entrada))|casella( (di posta|postale))?"
                    r"|postvak|skrzynka|ящик)\b.{0,30}(voll|pleine|llen[oa]|cheia|lotada"
                    r"|pien[ao]|\bvol\b|pe.na|przepe.niona|переполнен)"
                    r"|speicherplatz.{0,20}(.berschritten|ersch.pft)|превышен\w{0,6} квот"),
    ("hostunknown", r"\bdomain(e)? (existiert nicht|unbekannt|inconnu|inexistant)"
                    r"|dominio (desconocido|inexistente|no existe|n.o existe|sconosciuto)"),
    # ("security" alone, not a product's name: "InterScan Messaging Security Suite", an
    # "Email Security Gateway" or "Appliance" reporting on a refusal of another kind)
    ("securityerror", r"tls|starttls|encryption|certificate|authentication required"
                      r"|security(?! (suite|gateway|appliance|virtual|cloud|service|server))"
                      r"|unauthenticated senders?"
                      r"|must (issue|use) .{0,20}(auth|starttls)|smtp auth"),
    ("policyviolation", r"policy|prohibited|not allowed|violat|administrat(ive|or)"
                        r"|forbidden"),
    ("contenterror", r"content|header.{0,20}(invalid|error)|(mime|encoding|charset) error"
                     r"|invalid mime|unnecessary base64"
                     r"|header syntax"
                     r"|8-?bit|attachment"
                     # a header field the message lacks ("Messages without To: fields are not
                     # accepted here"): its header, not its sender or its address, was refused
                     r"|without (an? |any )?[\w\-]+:? (header )?fields?\b"
                     r"|missing (an? |the )?(valid |required )?[\w\-]+:? header"),
    # qmail's badrcptto: the address is on the server's own list of recipients it refuses
    ("filtered", r"filter|recipient preferences|refused by|rejected by (the )?recipient"
                 r"|in my badrcptto list"
                 r"|recipient.{0,20}refus"),
    ("expired", r"(retry|delivery|queue|time|lifetime).{0,40}(expired|exceeded|timeout|time out)"
                r"|(could )?not (be |been )?delivered (for|within|in) .{0,20}(days|hours)|too long"
                r"|gave up|giving up|has been delayed|not (yet )?been delivered"
                r"|after multiple retries|within the allowed queue period"
                r"|delivery (attempts|time).{0,20}(failed|exhausted)|expired"
                # "was aborted after 5.0 hour(s)", "has not been collected after 30 days"
                r"|(aborted|abandoned|not been (collected|delivered|retrieved|picked up))"
                r" (after|for|within|in) [\d.]+ (hour|day)"),
    ("networkerror", r"connection (was |has been )?(refused|timed? ?out|reset|closed|lost"
                     r"|dropped)"
                     r"|timed? ?out|network (error|failure|problem|is unreachable|is down)"
                     r"|unreachable"
                     r"|cannot connect|could not connect|\bconnect(ion)? failed"
                     r"|unable to connect|dns (error|failure|lookup)|routing loop|mail loop"
                     r"|socket error|requests to connect"
                     r"|too many hops|loop detected|(message|mail) looping"
                     r"|forwarding loop(?! broken)"),
    ("mailererror", r"mailer error|(pipe|command|program).{0,30}(fail|error|exit)"
                    r"|x-unix|unix;"
                    r"|procmail|local delivery failed|exit (code|status)"),
    ("systemerror", r"config(uration)? error|server is misconfigured|queue file write error"
                    r"|temporary local problem|interrupted system call|forwarding loop broken"
                    r"|can.?t create (user )?output file"),
    ("systemerror", r"system error|internal (server )?error|temporary (failure|error)"
                    r"|(temporary )?system problem"
                    r"|server error|local error|try (again )?later|service.{0,20}(not available"
                    r"|unavailable|refused?)|resources|transaction failed"),
    ("syntaxerror", r"syntax error|command unrecognized|unrecognized command|unknown command"
                    r"|command not (recognized|implemented)"),
    # before Postfix's "<a@example.org>: Recipient address rejected: <why>", which says only
    # that RCPT TO was refused: the words after it, when they say why, win
    ("onhold", r"on hold|\bheld\b"),
    ("userunknown", r"(recipient )?address rejected"),
    ("rejected", r"invalid sender|\bbatv\b|sender domain is empty"
                 r"|fully qualified (e-?mail )?address required|unroutable sender"
                 r"|no third.party dsns?|returned mail not accepted"),
    # ("MAIL FROM:" with its colon is a field of a report's message details, not a refusal)
    ("rejected", r"sender.{0,40}(reject|denied|refused|invalid|unknown|not allowed|blocked)"
                 r"|(reject|denied|refused).{0,30}sender|envelope.from|mail from(?!:)"
                 r"|domain of sender|from address|return.path|rejected|denied|refused"),
    # a mailing list that refused the post (Google Groups says so in 40 languages)
    ("rejected", r"google groups"),
)
_PHRASE_RES = tuple((reason, re.compile(pattern, re.I)) for reason, pattern in _PHRASES)


# what a refusal says after these words is why ("rate limited because DKIM did not pass")
_BECAUSE = re.compile(r"\bbecause\b(?: of\b)?", re.I)


# A report often gives all its recipients the same words; reading them takes ~2 ms a KB.
@functools.lru_cache(maxsize=256)
def phrase_reason(text: str) -> str | None:
    """The reason the words name; where they say "because", the reason named after it."""
    if (cause := _BECAUSE.search(text)) and (said := _first(text[cause.end():])):
        return said
    return _first(text)


def _first(text: str) -> str | None:
    for reason, regex in _PHRASE_RES:
        if regex.search(text):
            return reason
    return None
