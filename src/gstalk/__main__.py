"""``python -m gstalk`` runs the command line."""

from gstalk.cli import main

main()
