"""Ways to run the stages: in one process (``LocalPipeline``); Serve and Ray Data adapters."""

from omnistage.pipelines.local import ChatResult, LocalPipeline

__all__ = ["ChatResult", "LocalPipeline"]
