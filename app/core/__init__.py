"""The foundation every stage stands on: configuration, storage and publishing, contracts,
cluster resolution, MLflow tracking, logs, errors and the closing report.

Imports nothing from the stage packages (``app.data``, ``app.train``, ``app.serve``).
"""
