"""``python -m pagoda_tokenizer --model DIR --engines host:port[,host:port...] --port N``"""

from __future__ import annotations

import asyncio
import logging
import sys

from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.server import serve
from pagoda_tokenizer.workers import LOG_FORMAT, supervise


def main() -> int:
    config = TokenizerConfig.from_args()
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    return asyncio.run(serve(config)) if config.workers == 1 else supervise(config)


if __name__ == "__main__":
    sys.exit(main())
