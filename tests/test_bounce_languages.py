"""A bounce's words in the languages servers answer in besides English: where the code is a
generic 5.0.0 the sentence is the fact, and it is read as the same words in English are
(a full mailbox soft; an address that does not exist hard when it answered RCPT, a filter's
at a stage no one named, as "user unknown" is)."""

from __future__ import annotations

import pytest

from relay.feedback.bounce_phrases import phrase_reason
from relay.feedback.bounce_reasons import classify

NO_SUCH_USER = [
    "Benutzer unbekannt", "Empfänger unbekannt", "Die Adresse existiert nicht",  # German
    "destinataire inconnu", "L'adresse email n'existe plus",  # French
    "usuario desconocido", "La dirección de correo no existe",  # Spanish
    "usuário desconhecido", "O usuário não existe",  # Portuguese
    "utente sconosciuto", "L'indirizzo non esiste",  # Italian
    "onbekende gebruiker", "Dit adres bestaat niet",  # Dutch
    "Adres odbiorcy nie istnieje", "Użytkownik nie istnieje",  # Polish
    "Пользователь не найден", "адрес не существует",  # Russian
]
MAILBOX_FULL = [
    "Postfach ist voll", "La boîte aux lettres est pleine", "El buzón está lleno",
    "A caixa postal está lotada", "La casella di posta è piena", "postvak is vol",
    "Skrzynka odbiorcy jest pełna", "Почтовый ящик переполнен", "Speicherplatz überschritten",
]


@pytest.mark.parametrize("words", NO_SUCH_USER)
def test_an_address_that_does_not_exist(words: str) -> None:
    assert phrase_reason(words) == "userunknown"
    assert classify("5.0.0", 550, words, stage="RCPT", remote_reply=True) == (
        "userunknown", "hard")
    # a remote's words at a stage the report does not name: a filter's, as in English
    assert classify("5.0.0", 550, words, remote_reply=True) == \
        classify("5.0.0", 550, "user unknown", remote_reply=True)


@pytest.mark.parametrize("words", MAILBOX_FULL)
def test_a_full_mailbox(words: str) -> None:
    assert classify("5.0.0", 550, words, stage="RCPT", remote_reply=True) == (
        "mailboxfull", "soft")


@pytest.mark.parametrize("words", ["Domain existiert nicht", "dominio inexistente",
                                   "domaine inconnu"])
def test_a_domain_that_does_not_exist(words: str) -> None:
    assert phrase_reason(words) == "hostunknown"


@pytest.mark.parametrize("words", ["500 5.5.1 Command not recognized", "Unknown command"])
def test_a_command_not_recognized_is_no_unknown_recipient(words: str) -> None:
    """"not recognized" names an unknown recipient only with the recipient it is about
    (Exchange's "The recipient name is not recognized")."""
    assert classify(None, 550, words, remote_reply=True) == ("syntaxerror", "soft")
    assert phrase_reason("The recipient name is not recognized") == "userunknown"
