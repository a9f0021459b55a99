"""``python -m pagoda_tokenizer --model DIR --engines host:port[,host:port...] --port N``"""

from __future__ import annotations

import asyncio
import logging

from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.server import serve


def main() -> None:
    config = TokenizerConfig.from_args()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
