"""Offline half of the product: data, losses, optimizers, the loop, reports and publishing."""
