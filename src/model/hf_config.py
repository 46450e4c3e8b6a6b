"""Inline transformers configs from recipes: `llm.config` and `vision.config` name a `model_type`
plus its fields, and both are checked and typed the same way here, so a typo in either fails
with the same message and a value typed on the command line means the same in both."""

from __future__ import annotations

from transformers import AutoConfig


def coerce_text(value: object, default: object) -> object:
    """A value set on the command line (`--model.llm.config.hidden_size 256`) arrives as text:
    typed like the field's default (bool, int, float); anything else is returned as it is."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() == "true"
    if isinstance(default, (int, float)):
        number = float(value)
        return int(number) if isinstance(default, int) and number.is_integer() else number
    return value


def inline_fields(model_type: str, values: dict, where: str) -> tuple[dict, dict]:
    """(`values` typed by `coerce_text`, the config's defaults); a key the `model_type` config does
    not know is an error naming it, since transformers would keep it silently as an attribute."""
    defaults = AutoConfig.for_model(model_type).to_dict()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"{where} has keys that {model_type} configs do not know: {unknown}")
    return {key: coerce_text(value, defaults[key]) for key, value in values.items()}, defaults
