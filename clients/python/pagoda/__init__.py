"""Pagoda's wire types: the Python code generated from protos/ lives in ``pagoda.v1``."""
