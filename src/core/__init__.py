"""The bottom layer: what every other layer may use and which imports nothing of the kit
(the OpenAI-compatible chat client, used by the instruction generator and by the judges)."""
