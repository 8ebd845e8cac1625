"""Fully sharded sparse data parallelism (FSSDP, after Hecate, arXiv 2502.02581).

placement.py   owner sharding and per-step replica placement from predicted expert load
collectives.py SparseAllGather / SparseReduceScatter of whole experts, and the autograd function that pairs them
experts.py     the expert module that owns a shard and computes on the materialized experts
"""
