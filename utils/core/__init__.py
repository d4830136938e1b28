"""Layer 0, imports nothing else of this project: errors, file writing, command-line helpers,
configuration, the sealed result set."""
