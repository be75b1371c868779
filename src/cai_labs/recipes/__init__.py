"""End-to-end recipes: short, complete procedures that produce an artifact (a checkpoint)."""
