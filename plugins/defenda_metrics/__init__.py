"""Built-in metrics (a plugin package registered through the 'defenda' entry-point group)."""
