"""Helpers for hpframe's own tests (multi-process harness). Not imported by the runtime."""
