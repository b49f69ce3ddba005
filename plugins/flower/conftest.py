# defenda's pytest helpers (fixtures register_plugin, tiny_case, defenda_cli, …) are opt-in:
pytest_plugins = ["defenda.testing"]
