"""Ways to run the stages: in one process (``LocalPipeline``), as a Serve app (``serve``), as Ray
Data jobs (``batch``).

``LocalPipeline`` is imported on first use, so the light modules here (``demo``, ``messages``)
stay usable from a client-only install.
"""

from typing import Any

__all__ = ["ChatResult", "LocalPipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from omnistage.pipelines import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
