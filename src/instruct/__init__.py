"""Teacher-LLM instruction data: captions and boxes in, LLaVA conversations and shards out.

`client` is the OpenAI-compatible Chat Completions client, shared with the judge in `src.eval`.
"""
