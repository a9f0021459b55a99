"""``python -m pagoda_tokenizer --model DIR --engines host:port[,host:port...] --port N``"""

from __future__ import annotations

import asyncio
import logging
import sys

from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.server import serve


def main() -> int:
    config = TokenizerConfig.from_args()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
