"""Hook-based comparison of a Megatron model (any TP/PP/EP/ETP/VPP layout) with its HF model.

capture.py (forward hooks from the family's hook table), normalize.py (micro-batches, [s, b] -> [b, s],
TP gather, collection from the pipeline stages), compare.py (the run and the metrics), report.py (table,
JSON, plot), cli.py (`megatron-patch compare`).
"""
