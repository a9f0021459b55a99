"""Pagoda's tokenizer service: the text-level front door (pagoda.v1.Tokenizer) over one or more engines.

Text and chat messages become token ids (tokenizer.py, chat_template.py), go to an engine the pool picks
(engine_pool.py, prefix_affinity.py), and the tokens streaming back become text (generation.py,
sample_stream.py, detokenizer.py, stop_strings.py). server.py serves it over gRPC; config.py holds the knobs.
"""
