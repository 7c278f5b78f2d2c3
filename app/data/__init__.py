"""The data stage: raw rating sources, validation, duplicates, id vocabularies, labels and splits,
MDS shards, the prepared-dataset contract and its readers (users' histories included).

May import ``app.core`` only.
"""
