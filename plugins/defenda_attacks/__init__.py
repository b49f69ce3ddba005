"""Built-in attacks (a plugin package registered through the 'defenda' entry-point group)."""
