"""Headless training (`python -m trainer`) built on `sana/`, never on `nodes/`."""
