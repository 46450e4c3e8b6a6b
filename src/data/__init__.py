"""The data layer: shards, records, templates, views, streaming, batching. It imports nothing of the
model, training or eval layers: of a model it knows only the `DataSpec` it is handed (`spec`)."""
