"""Checkpoint I/O shared by convert, verify and training (safe loading so far)."""
