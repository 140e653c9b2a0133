"""Shipped model weights and their model cards; see `deblend.models.registry`."""
