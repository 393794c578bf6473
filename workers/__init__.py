"""Workers: the only place clients are built (Settings -> clients -> Worker)."""
