"""Online half of the product: a BentoML service over one verified artifact version."""
