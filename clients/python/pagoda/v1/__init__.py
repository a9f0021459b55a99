"""Generated from protos/pagoda/v1 by ``make proto`` (grpcio-tools 1.84.0); do not edit the stubs by hand.

- ``engine_pb2`` / ``engine_pb2_grpc``: the token-level Engine service and the shared types
  (SamplingParams, FinishReason, Usage, Logprob, TokenLogprobs, ModelInfo, Abort).
- ``tokenizer_pb2`` / ``tokenizer_pb2_grpc``: the text-level Tokenizer service, the public front door.
"""
