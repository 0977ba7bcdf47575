"""Regression pairs and training data: the on-disk pair format (format.py), pair generation with the teacher's
sampler (generation.py, `dmd pairs`) and the training streams (stream.py)."""
