"""arcee: flow-matching Zigzag-Mamba image generators with the Arcee cross-block state chain.

Layers, bottom up: ops, flow, data -> models -> sample -> train, metrics -> entry points.
"""
__version__ = "0.1.0"
