"""A Ray-native two-tower recommender, one package per stage of the pipeline.

Imports run one way, from the top down: ``app.run`` (the full run) -> ``app.tune`` ->
``app.serve`` -> ``app.train`` -> ``app.data`` -> ``app.core``.
"""
