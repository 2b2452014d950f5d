"""A published collection: each cluster's shared bases once, a members list, and the settings that made them.

Owns the collection repo's format (format.py), writing one from a compression (build.py), projecting a new
adapter onto its bases (project.py, pure torch) and the join job (join.py). Hub traffic for it is in
hub/collection.py. Not to be confused with lab/collection, the set of real adapters we trained.
"""
