"""Vectors to words: the captioners (pooled, attention), greedy and beam search, ensembles, CIDEr-D and
consensus re-ranking, and captioning photos with a trained run (inference)."""
