"""Vectors to words: the vocabulary, the LSTM captioner, decoding and the training loops."""
