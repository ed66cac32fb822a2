"""The neighbour report: which memory entries moved each token's probability (JSON + one HTML page)."""
