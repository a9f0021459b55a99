"""Histogram buckets (seconds) that both services' Prometheus metrics share.

The same edges on the front door and on the engines, so that a dashboard can set the tokenizer service's
time to first token or request latency beside an engine's, bucket for bucket (the difference is what the
front adds: tokenizing, routing, detokenizing). Constants only: no prometheus_client here, which the base
install does not have.
"""

# Between tokens: millisecond decode steps to the seconds a preempted sample waits to be recomputed.
TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# To the first token: the same, then minutes of queue (up to max_waiting_requests wait their turn).
FIRST_TOKEN_BUCKETS = (*TOKEN_BUCKETS, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
# A whole request.
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
