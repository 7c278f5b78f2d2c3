"""The training stage: the two-tower model, the per-worker training loop in named steps, the
driver that runs it under Ray Train, checkpoints, placement, rendezvous, baselines, metrics, and
the model folder contract that every later stage reads.

May import ``app.core`` and ``app.data``.
"""
