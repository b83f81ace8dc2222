import sys

from jaxedit.cli.main import main

sys.exit(main())
