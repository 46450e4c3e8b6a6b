"""WebDataset shards: writing them from LLaVA-format data, and inspecting any shard set before
training on it. What lives where:

- `writer.py`: `write_shards` (LLaVA records + an image folder -> `{prefix}-NNNNNN.tar`, `sizes.json`
  and `{prefix}-summary.json`), the sample keys, the size-capped shard sink, and why each decision.
- `inspector.py`: `inspect_shards` / `format_report`, counts over a shard set read as training reads it.
- `cli.py` (run as `python -m src.data.shards write|inspect`): the command line over the two.

The shards' reader lives in `src/data/stream.py`; the checks both sides share in `src/data/records.py`,
`src/data/decode.py` and `src/data/inputs.py`.
"""

from src.data.shards.inspector import format_report, inspect_shards
from src.data.shards.writer import format_summary, write_shards

__all__ = ["format_report", "format_summary", "inspect_shards", "write_shards"]
