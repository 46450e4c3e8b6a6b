"""The bottom layer: what every other layer may use and which imports nothing of the kit.

- `constants`: the ignore index, the `<image>` placeholder, the part names, dtypes by name.
- `chat_client`: the OpenAI-compatible chat client, used by the instruction generator and by the judges.
"""
