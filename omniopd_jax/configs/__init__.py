"""Task configs (`get_config(arg)` with variants), importable from an installed package."""
