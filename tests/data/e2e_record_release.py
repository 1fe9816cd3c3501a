"""Health command for tests: append the release path it was given to $E2E_RECORD, then translate
like the stand-in model (adapterctl.demo_translator) with that release."""

import os
import sys

from adapterctl import demo_translator

with open(os.environ["E2E_RECORD"], "a", encoding="utf-8") as f:
    f.write(sys.argv[1] + "\n")
sys.exit(demo_translator.main(sys.argv[1:]))
