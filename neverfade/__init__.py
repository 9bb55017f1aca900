"""neverfade: inference-time methods that keep a vision-language model's visual attention from fading."""

__version__ = "0.1.0"
