"""Fault injection: real processes, a private PostgreSQL, a TCP fault proxy and hostile peers."""
