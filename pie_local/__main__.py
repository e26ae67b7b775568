import sys

from pie_local.cli import main

sys.exit(main())
