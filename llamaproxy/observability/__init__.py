"""What the gateway tells operators: metrics, logs, the access log, the usage ledger and /health."""
