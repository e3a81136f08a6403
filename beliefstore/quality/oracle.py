"""Oracle methods: what is achievable with the fold's inputs when the world's hidden
parameters are known. Measurement only — a real deployment knows neither the agents'
true reliabilities nor the drift process.

* :func:`true_trust`: each source's trust that makes it calibrated, ``1 / k``
  (the world's agents report ``σ(k · logit p)``), for the fold with perfect trust.
* :func:`bayes_filter`: the exact posterior of each key's current value given the same
  counting observations the fold uses (DESIGN.md steps 1–3), the agents' true
  reliabilities and the world's drift process — a forward filter on the hidden Markov
  model the world simulates (Rabiner 1989, the forward algorithm):

  - prior: uniform over the attribute's ``K`` values (the world draws the first value
    uniformly, and the drift keeps the uniform distribution stationary);
  - drift: the value jumps at rate ``λ = 1 / mean_dwell`` to one of the other ``K − 1``
    values uniformly, so over a gap ``Δ`` the distribution ``π`` becomes
    ``e^(−μΔ) · π + (1 − e^(−μΔ)) / K`` with ``μ = λ K / (K − 1)`` (the chain's
    non-zero eigenvalue);
  - observation: a report of ``x`` with confidence ``c`` by an agent of scale ``k`` is
    right with ``p = σ(logit(c) / k)``: likelihood ``p`` if the value is ``x``, else
    ``(1 − p) / (K − 1)`` (the world picks a wrong value uniformly).

  - corrections: the world's person corrects a wrong observation with probability
    ``ρ`` (``WorldSpec.correction_probability``) minutes after it, and the source then
    retracts it. A first observation still live at the read (no retraction, no
    re-check by its source in the minutes before it) survived that, so it is right with
    ``p / (p + (1 − ρ)(1 − p))`` (Bayes' rule); a follow-up observation (the source's
    earlier observation of the key is at most :data:`FOLLOW_UP_MS` older) is a fresh
    draw, right with ``p``.

  Its top value's probability is the Bayes-optimal answer with those inputs: no merge of
  the same observations has a lower expected Brier score, and no method has fewer
  expected repeat questions than ``Σ (1 − P(top))`` over the needed attributes (asking
  costs 1, answering costs the probability of being wrong). It ignores what corrections
  reveal (a retraction means the retracted value was wrong), as the fold does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from beliefstore.events.model import Event, ObservationRecorded
from beliefstore.projector.fold import logit, sigmoid
from beliefstore.quality.baselines import Estimate, ReadMethod, counting_observations
from beliefstore.quality.world import WorldSpec

FOLLOW_UP_MS = 11 * 60_000
"""A re-check or re-observation after a correction follows its source's earlier
observation within 10 minutes in the world (:func:`beliefstore.quality.world.simulate`)."""


def true_trust(spec: WorldSpec) -> dict[str, float]:
    """Source → ``1 / confidence_scale``: the trust that calibrates each agent exactly
    (up to the 3-decimal rounding of reported confidences)."""
    return {a.source: 1.0 / a.confidence_scale for a in spec.agents}


def bayes_filter(spec: WorldSpec) -> ReadMethod:
    """The exact posterior of each key at the read instant (module docstring), as a
    :class:`~beliefstore.quality.baselines.ReadMethod`.

    Raises (when called):
        ValueError: an observation's attribute or value is not in ``spec``.
    """
    attrs = {(a.context, a.attribute): a for a in spec.attributes}
    scale = {a.source: a.confidence_scale for a in spec.agents}

    rho = spec.correction_probability

    def run(events: Iterable[Event], at: int) -> list[Estimate]:
        events = list(events)
        times: dict[tuple[tuple[str, str, str], str], list[int]] = {}
        for e in events:
            if isinstance(e, ObservationRecorded):
                times.setdefault((e.key, e.source), []).append(e.occurred_at)
        out = []
        for key, obs in counting_observations(events).items():
            a = attrs.get((key[1], key[2]))
            if a is None:
                raise ValueError(f"{key}: attribute not in the world spec")
            k_values = len(a.values)
            mu = k_values / ((k_values - 1) * a.mean_dwell_s * 1000.0)  # per ms
            post = {v: 1.0 / k_values for v in a.values}
            t = obs[0].occurred_at
            for o in [*obs, None]:
                t_next = at if o is None else o.occurred_at
                keep = math.exp(-mu * max(0, t_next - t))
                post = {v: keep * q + (1.0 - keep) / k_values for v, q in post.items()}
                t = max(t, t_next)
                if o is None:
                    break
                if o.value not in post:
                    raise ValueError(f"{key}: value {o.value!r} not in the world spec")
                p = sigmoid(logit(o.confidence) / scale.get(o.source, 1.0))
                follow_up = any(o.occurred_at - FOLLOW_UP_MS <= t0 < o.occurred_at
                                for t0 in times[(key, o.source)])
                if not follow_up:
                    p = p / (p + (1.0 - rho) * (1.0 - p))
                post = {v: q * (p if v == o.value else (1.0 - p) / (k_values - 1))
                        for v, q in post.items()}
                total = math.fsum(post.values())
                post = {v: q / total for v, q in post.items()}
            newest = obs[-1]
            top = max(post, key=lambda v: (post[v], v == newest.value, v))
            out.append(Estimate(key, top, min(1.0, post[top]), newest.occurred_at))
        return out

    return ReadMethod(run)
