"""Operations: logs, metrics, health checks, the CLI and the local launcher."""
