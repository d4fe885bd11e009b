"""What comes back: bounces, DSNs, VERP, tracking, reports and webhooks."""
