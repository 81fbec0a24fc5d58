"""Reverie imagine package."""
