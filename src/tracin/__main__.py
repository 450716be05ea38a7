"""``python -m tracin``."""

from tracin._cli import main

main()
