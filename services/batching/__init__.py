"""The batching service: assignment windows, weekly and Friday digests, quiet hours."""
