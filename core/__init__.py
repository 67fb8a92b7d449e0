"""The layer shared by training and serving: model builders, metrics math, artifact I/O.

Nothing here imports BentoML or the training loop.
"""
