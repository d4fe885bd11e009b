"""SMTP in: the listeners (submission, relay, inbound) and their limits."""
