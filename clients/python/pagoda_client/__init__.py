"""Pagoda's Python client library and command-line tools.

The generated gRPC stubs are in ``pagoda.v1``; this package holds what is written by hand on top of
them, such as ``pagoda-fetch-model`` (``pagoda_client.fetch_model``), which converts the default model.

``Client`` and ``AsyncClient`` talk to the tokenizer service (the public text API): streamed text
deltas from ``generate``/``chat``, ``tokenize``, ``detokenize``, ``model_info`` and ``health``, with
failed calls raised as ``PagodaError`` subclasses. ``pagoda`` (``pagoda_client.cli``) is the same from
the terminal, and ``python -m pagoda_client.demo`` runs the whole path on one CPU machine.
"""

from pagoda_client.client import DEFAULT_TARGET, AsyncClient, AsyncTextStream, Client, GenerateOptions, TextStream
from pagoda_client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PagodaError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "AsyncTextStream",
    "Client",
    "FailedPreconditionError",
    "GenerateOptions",
    "InvalidArgumentError",
    "PagodaError",
    "ResourceExhaustedError",
    "TextStream",
    "UnauthenticatedError",
    "UnavailableError",
]
