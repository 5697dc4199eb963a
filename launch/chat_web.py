"""The chat page: an alias of launch/serve.py (one server serves the page and the OpenAI API).

    python launch/chat_web.py --ckpt out/sft --port 8000
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv[0] = str(Path(__file__).with_name("serve.py"))
    runpy.run_path(sys.argv[0], run_name="__main__")
