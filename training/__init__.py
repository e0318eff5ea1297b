"""Training: what `train` runs (recipe.py), the skeleton and loop every phase shares, batches from
the feature store, and one module per phase in phases/.

It imports decoder/ (the captioners) and evaluation/ (the validation CIDEr-D); neither imports it.
"""
