"""`python -m src.data.shards write|inspect`: see `src.data.shards.cli`."""

from src.data.shards.cli import main

main()
