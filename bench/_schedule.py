"""Load schedules: when each request of an open-loop run is meant to be sent.

    constant:R          R requests/s for the whole duration (``--rate R``)
    step:R1,R2,...      the duration split in equal steps, R1 requests/s, then R2, ...
    ramp:R0:R1          from R0 to R1 requests/s, linearly over the duration

The schedule fixes every intended send time before the run starts. Latency
counts from the intended time, so a request the generator (or a stalled
server) could not send on time is late by the whole delay: no coordinated
omission.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Schedule:
    kind: str
    rates: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        kind, _, rest = text.partition(":")
        try:
            if kind == "constant":
                rates = (float(rest),)
            elif kind == "step":
                rates = tuple(float(x) for x in rest.split(","))
            elif kind == "ramp":
                r0, r1 = rest.split(":")
                rates = (float(r0), float(r1))
            else:
                raise ScheduleError
        except (ValueError, ScheduleError):
            raise ScheduleError(f"schedule {text!r}: expected constant:R, step:R1,R2,... or ramp:R0:R1") from None
        if any(r < 0 for r in rates) or max(rates) <= 0:
            raise ScheduleError(f"schedule {text!r}: rates must be non-negative and one of them positive")
        return cls(kind, rates)

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"constant {self.rates[0]:g}/s"
        if self.kind == "step":
            return "steps " + " -> ".join(f"{r:g}" for r in self.rates) + " /s"
        return f"ramp {self.rates[0]:g} -> {self.rates[1]:g}/s"

    def spec(self) -> str:
        sep = "," if self.kind == "step" else ":"
        return f"{self.kind}:" + sep.join(f"{r:g}" for r in self.rates)

    def offsets(self, duration: float) -> np.ndarray:
        """Every intended send time, in seconds from the start, ascending, all < duration."""
        if self.kind == "constant":
            return np.arange(int(self.rates[0] * duration)) / self.rates[0]
        if self.kind == "step":
            step = duration / len(self.rates)
            parts = [i * step + np.arange(int(r * step)) / r for i, r in enumerate(self.rates) if r > 0]
            return np.concatenate(parts) if parts else np.zeros(0)
        r0, r1 = self.rates
        # Requests sent by t: N(t) = r0 t + (r1 - r0) t^2 / 2D; request i goes at N(t) = i.
        n = int(self.total(duration))
        i = np.arange(n, dtype=np.float64)
        a = (r1 - r0) / (2 * duration)
        if abs(a) < 1e-12:
            return i / r0
        return (-r0 + np.sqrt(np.maximum(r0 * r0 + 4 * a * i, 0.0))) / (2 * a)

    def total(self, duration: float) -> float:
        if self.kind == "ramp":
            return (self.rates[0] + self.rates[1]) / 2 * duration
        return sum(self.rates) / len(self.rates) * duration

    def rate_at(self, t: float, duration: float) -> float:
        if self.kind == "constant":
            return self.rates[0]
        if self.kind == "step":
            return self.rates[min(len(self.rates) - 1, int(t / duration * len(self.rates)))]
        return self.rates[0] + (self.rates[1] - self.rates[0]) * t / duration
