"""Entry point: ``python -m data_pipelines build NAME --data-dir DIR ...``."""

import sys

from data_pipelines import cli

if __name__ == '__main__':
  sys.exit(cli.main())
