"""Built-in defenses (a plugin package registered through the 'defenda' entry-point group)."""
