"""Config system: registry, YAML dialect, overrides."""
