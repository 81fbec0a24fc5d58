"""Reverie learning package."""
