"""LLaVA experiment kit: vision tower + projector + LLM, trained with Lightning."""
