"""Images and captions to a dataset: reading sources, cleaning, splitting, the vocabulary; the synthetic set."""
