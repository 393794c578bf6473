"""Workflows: one runbook per module. Decisions and timing only; every side effect is an activity."""
