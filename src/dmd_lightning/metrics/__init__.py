"""Evaluation: the Evaluator interface that validation calls, and offline FID/KID with torch-fidelity."""
