"""Runtime targets: execution-provider profiles, preparation and emission for them."""
