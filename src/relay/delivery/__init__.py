"""Delivery: the scheduler, rendering (tracking, List-Unsubscribe, DKIM), outbound SMTP, MX lookups and the worker and signer processes."""
