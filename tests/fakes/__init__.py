"""Fake servers for testing the real client libraries offline (127.0.0.1, port 0)."""
