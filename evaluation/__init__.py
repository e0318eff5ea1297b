"""Judging captions: the standard metrics, `evaluate` on a split, the HTML report and the attention
heat maps.

It sits above decoder/ (it captions with it) and below training/, which picks best.pt by the
validation CIDEr-D of evaluation/metrics.py.
"""
