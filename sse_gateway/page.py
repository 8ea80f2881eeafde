"""Where the chat page's built files live: inside this package (`sse_gateway/static/`).

Vite builds `templates/` into it (`make page`, which needs Node.js) and the build is committed,
so that a fresh clone, an sdist and a wheel all carry the page: `pip install .` then
`sse-gateway` serves it on a machine without Node (issue 12). A test checks that the committed
build is what the sources build to.
"""

from __future__ import annotations

from pathlib import Path

PAGE_DIR = Path(__file__).resolve().parent / "static"
INDEX = PAGE_DIR / "index.html"
