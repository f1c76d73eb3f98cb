import sys

from amstream.cli import main

sys.exit(main())
