"""Reverie bot package."""
