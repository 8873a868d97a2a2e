"""See the package docstring of ppdet_retina.modeling."""
