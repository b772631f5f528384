import sys

from sola_stream.cli import main

sys.exit(main())
