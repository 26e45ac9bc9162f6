"""ml_collections configs: ``get_config(arg)`` with named variants."""
