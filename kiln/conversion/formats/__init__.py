"""Readers of foreign checkpoint formats."""
