"""Small helpers every step uses: atomic writes, input bounds, quiet logging, hub access, paths."""
