"""An autoscaling policy for the stage pools that counts work in seconds, not in requests.

Serve's default policy sizes a pool by requests in flight per replica (``target_ongoing_requests``).
A request is a poor unit for a multimodal pool: one image generation keeps a generator replica
busy for seconds, one image question keeps an encoder replica busy for milliseconds, and a batched
encoder is no busier with eight requests in one batch than with one. Under a mix that shifts, the
pools then scale on how many requests pass rather than on what they cost.

``UtilisationPolicy`` reads what each replica reports (``record_autoscaling_stats`` in
``omnistage.pipelines.deployments``): ``busy``, the seconds of model work per second of wall time
(a replica decoding media on several threads can exceed 1), ``cost_s``, its recent seconds of work
per item, and ``backlog_s``, the items queued in it at that cost. Requests still queued at the
callers' handles (Serve's ``total_queued_requests``) are priced at the replicas' mean cost. The
pool wants::

    replicas = (sum of busy + (backlog in the replicas + backlog at the handles) / drain_s) / target_utilisation

Serve applies ``min_replicas``, ``max_replicas`` and the up- and downscale delays on top, as for
its own policy. Choose it per pool with ``scaling.policy: utilisation``, for encoder, projector and
generator pools. Not for the LLM pool: its engine steps back to back whenever it holds a single
sequence, so its seconds of work say nothing of its spare capacity; sequences in flight
(``target_ongoing_requests``) do.
"""

from __future__ import annotations

from typing import Any


class UtilisationPolicy:
    """A Serve autoscaling policy (Serve builds it once per pool with ``policy_kwargs``)."""

    def __init__(self, target_utilisation: float = 0.7, drain_s: float = 2.0):
        self.target_utilisation = target_utilisation
        self.drain_s = drain_s

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """``ctx`` is a ``ray.serve.config.AutoscalingContext``; returns the replicas wanted and
        the policy's state (none kept)."""
        metrics = ctx.aggregated_metrics or {}
        busy, backlog, cost = metrics.get("busy", {}), metrics.get("backlog_s", {}), metrics.get("cost_s", {})
        if not busy:
            # No replica has reported yet (just started): keep what there is.
            return ctx.target_num_replicas, {}
        at_handles = ctx.total_queued_requests * sum(cost.values()) / max(len(cost), 1)
        demand = sum(busy.values()) + (sum(backlog.values()) + at_handles) / self.drain_s
        return demand / self.target_utilisation, {}
