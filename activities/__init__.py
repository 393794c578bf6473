"""Activities: every side effect of a runbook, one class per external system."""
