"""neverfade: inference-time methods that keep a vision-language model's visual attention from fading."""

from neverfade.api import DEFAULT_PROMPT, Caption, Captioner, attach, load
from neverfade.methods import METHODS, Method

__version__ = "0.1.0"
__all__ = ["load", "attach", "Captioner", "Caption", "DEFAULT_PROMPT", "METHODS", "Method"]
