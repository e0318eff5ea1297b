"""Images to vectors: image loading, the crop policy, the encoder and its weights."""
