"""Built-in tasks (a plugin package registered through the 'defenda' entry-point group)."""
