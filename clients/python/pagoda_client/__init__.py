"""Pagoda's Python client library and command-line tools.

The generated gRPC stubs are in ``pagoda.v1``; this package holds what is written by hand on top of
them, such as ``pagoda-fetch-model`` (``pagoda_client.fetch_model``), which converts the default model.
"""
