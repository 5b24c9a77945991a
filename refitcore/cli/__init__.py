"""The trtrefit command line: argparse and exit codes only."""
