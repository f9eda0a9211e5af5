import sys

from longcpt.cli import main

sys.exit(main())
