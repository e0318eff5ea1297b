"""Vectors to words: the LSTM captioner, search, the training phases on one skeleton, metrics, inference."""
