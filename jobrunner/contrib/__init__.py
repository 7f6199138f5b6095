"""Optional integrations; each imports its framework lazily and says how to install it."""
