"""TaskEdge device runtime (no torch)."""
