import sys

from neverfade.cli import main

sys.exit(main())
