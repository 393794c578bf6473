"""Starters: the `drp` CLI, one starter per runbook, and (later) the alert receiver."""
