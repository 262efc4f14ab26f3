"""fastrlhf.models: model loading, value and score heads, and the embedded tiny model."""
