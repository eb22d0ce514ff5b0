"""Stage classes of the five-stage MM-LLM: encoders, projectors, LLM backbone, generators.

Each stage is a plain class: it loads its model in ``__init__`` from a stage config and is called
with a list of inputs, returning a list of outputs of the same length. Nothing here knows Ray
Serve or Ray Data; ``omnistage.pipelines`` deploys them.

Importing this package is cheap: torch, transformers and diffusers load only when a stage module
is imported.
"""

from omnistage.actors.errors import InvalidInputError, UnsupportedMediaError

__all__ = ["InvalidInputError", "UnsupportedMediaError"]
