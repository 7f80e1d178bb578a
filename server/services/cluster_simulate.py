"""SimulateAudience in a cluster: checked here as on one node, replayed by every partition's owner.

The span, the sample size and the definition are checked exactly as one node
checks them (services/simulate.py), before anything leaves this node; then
the ``scatter`` port (cluster/queries.py) has each owner replay its
partitions' history and adds the timelines up. The deadline is the client's,
at most ``seconds``.
"""

from __future__ import annotations

from ..domain.simulate import SimulationTooSlow, Timeline
from .audiences import check_target
from .cluster_audiences import definition_of
from .deadlines import budget
from .simulate import SimulateService


class ClusterSimulateService(SimulateService):
    """SimulateService over the partitions' owners (see the module docstring)."""

    def __init__(self, scatter, reads, clock, attribute_types: dict, event_model_props: dict, seconds: float = 120.0):
        self.scatter = scatter  # .simulate(condition, start, end, bucket, sample, budget) -> Timeline
        self.reads = reads
        self.clock = clock
        self.attribute_types = attribute_types
        self.event_model_props = event_model_props
        self.seconds = seconds

    async def simulate(self, audience_id: str | None, draft: dict | None, start_us: int | None, end_us: int | None,
                       bucket_us: int | None, sample: int, last_us: int | None = None) -> Timeline:
        check_target(audience_id, draft, sample)
        start, end, bucket = self._span(start_us, end_us, bucket_us, last_us)
        draft = definition_of(self.reads, audience_id, draft, self.attribute_types, self.event_model_props)
        seconds = budget(self.seconds)
        if seconds <= 0:
            raise SimulationTooSlow("the call's deadline has passed")
        return await self.scatter.simulate(draft, start, end, bucket, sample, seconds)

    def close(self) -> None:
        pass
