"""Serving: the one serving core, batch inference with Ray Data, the Ray Serve HTTP app and the
MLflow pyfunc, all over the model folder contract (``app.train.model_folder``).

May import ``app.core``, ``app.data`` and ``app.train``.
"""
