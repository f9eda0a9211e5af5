import sys

from longcpt.demo.pipeline import main

sys.exit(main())
