"""The master's life beside its work: readiness, systemd notifications, reload on SIGHUP."""
