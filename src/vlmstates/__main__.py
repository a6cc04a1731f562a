import sys

from vlmstates.cli import main

sys.exit(main())
