"""Tests that run kds against real services and processes."""
