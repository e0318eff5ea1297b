"""The floor every pipeline step stands on: what lives on disk and how it is written.

Manifests and the vocabulary, image decoding, the HDF5 feature store, checkpoints, run
directories and their metrics; safe writes, seeds and the torchrun helpers. It imports no other
package of légende (tests/test_imports.py).
"""
