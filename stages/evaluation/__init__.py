"""Evaluation stage: joins delayed labels to predictions; online metrics, drift, retraining."""
