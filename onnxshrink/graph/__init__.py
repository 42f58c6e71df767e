"""Read-only analyses of graphs shared by passes (shapes, costs, channel groups) and conversion."""
