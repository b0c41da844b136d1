"""Gittins index of a job's attained service under an observed service distribution (pure Python).

For a job that has attained ``age`` seconds of service, with total service S drawn from a survival
function F(t) = P(S > t), the Gittins index is

    G(age) = max over y > age of  (F(age) - F(y)) / integral_age^y F(t) dt

(the best probability of finishing per second of service invested). Serving the highest index first
minimises mean response time on one server when sizes are unknown but their distribution is
(Gittins 1989; Aalto, Ayesta and Righter 2009). It decreases with age when the hazard rate decreases
(heavy tails: least-attained-service first, FastServe's order) and increases where the hazard rate
rises (a job past the short mode of a bimodal mix is close to its end).

F is the Kaplan-Meier estimate from finished jobs (events) and live jobs (censored at their service
so far): finished jobs alone under-represent long jobs, which are still running when the short ones
they arrived with have finished.
"""
from __future__ import annotations

import numpy as np


def survival(events: list[float], censored: list[float]) -> list[tuple[float, float]]:
    """Kaplan-Meier steps ``[(t, F(t))]``, t ascending at each event time: F just after t."""
    points = sorted([(x, 1) for x in events] + [(x, 0) for x in censored])
    at_risk, f, steps, i = len(points), 1.0, [], 0
    while i < len(points):
        t, deaths, gone = points[i][0], 0, 0
        while i < len(points) and points[i][0] == t:
            deaths += points[i][1]
            gone += 1
            i += 1
        if deaths:
            f *= 1.0 - deaths / at_risk
            steps.append((t, f))
        at_risk -= gone
    return steps


def gittins_curve(steps: list[tuple[float, float]], age: float,
                  quantum: float = 0.0) -> tuple[float, list[tuple[float, float]]] | None:
    """``(F(age), [(F(age) - F(y), integral_age^y F), ...])`` for the thresholds y >= age + ``quantum``
    (a job is served a whole quantum before it is ranked again; on an empirical F, thresholds just past
    ``age`` would rank by the gap to the next sample, which is noise). When every observed event lies
    before the quantum's end, the threshold is the quantum's end: F is flat past the last event, so
    that is the best y. Only points that maximise ``num / (c + area)`` for some c >= 0 are kept (the
    upper hull, a handful). None when F(age) = 0 or no event lies past age."""
    f_age = 1.0
    for t, f in steps:
        if t > age:
            break
        f_age = f
    if f_age <= 0.0:
        return None
    points, area, last_t, last_f = [], 0.0, age, f_age
    start = age + quantum
    for t, f in steps:
        if t <= age:
            continue
        if last_t < start <= t and start > age and last_f < f_age:   # the threshold at the quantum's end
            points.append((f_age - last_f, area + last_f * (start - last_t)))
        area += last_f * (t - last_t)              # integral of F from age to t (F is a step function)
        last_t, last_f = t, f
        if t >= start and area > 0.0:
            points.append((f_age - f, area))
    if last_t < start and last_f < f_age:          # every event before the quantum's end
        points.append((f_age - last_f, area + last_f * (start - last_t)))
    if not points:
        return None
    return f_age, _hull(points)


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (num, area) points that maximise num / (c + area) for some c >= 0: seen from (-c, 0), the
    upper-left concave hull starting at the best ratio for c = 0 (area ascending)."""
    best = max(points, key=lambda p: p[0] / p[1])
    pts = [p for p in set(points) if p[1] >= best[1] and p[0] >= best[0]]
    hull: list[tuple[float, float]] = []
    for num, area in sorted(pts, key=lambda p: (p[1], -p[0])):
        if hull and num <= hull[-1][0]:
            continue                               # more area for no more probability: never best
        while len(hull) >= 2:                      # drop a point under the chord of its neighbours
            (n1, a1), (n2, a2) = hull[-2], hull[-1]
            if (n2 - n1) * (area - a1) <= (num - n1) * (a2 - a1):
                hull.pop()
            else:
                break
        hull.append((num, area))
    return hull


def index_from_curve(curve: tuple[float, list[tuple[float, float]]] | None, known: float = 0.0) -> float | None:
    """The Gittins index of a job at the curve's age that must first spend ``known`` seconds of work
    that cannot end it (a prompt still to prefill): max over y of (F(age) - F(y)) / (known F(age) +
    integral_age^y F). ``known`` = 0: the plain index."""
    if curve is None:
        return None
    f_age, points = curve
    return max(num / (known * f_age + area) for num, area in points)


def gittins_index(steps: list[tuple[float, float]], age: float, quantum: float = 0.0) -> float | None:
    """G(age) from Kaplan-Meier ``steps``, the threshold y at least ``age + quantum`` (see
    ``gittins_curve``). None when F(age) = 0 or no event lies past age."""
    return index_from_curve(gittins_curve(steps, age, quantum))


# ---------------------------------------------------------------------- in output tokens (numpy)
def token_survival(events: list[int], censored: list[int]) -> np.ndarray:
    """``F[t]`` = the Kaplan-Meier estimate of P(output length > t) for t = 0 .. max + 2, from finished
    jobs' lengths (``events``) and live jobs' generated counts (``censored``). Past the largest
    observation F is unknown; it is set to 0 two tokens past it (every job assumed to end there)."""
    n = max(list(events) + list(censored) + [0]) + 2
    F = np.ones(n + 1)
    for t, f in survival(events, censored):
        F[int(t):] = f
    F[n] = 0.0
    return F


def last_observed_age(F: np.ndarray, age: int) -> int:
    """``age``, or for a job older than ``F`` covers (its estimate predates the job's age) the oldest
    age at which F is still positive: where its index is read."""
    age = min(age, len(F) - 1)
    while age > 0 and F[age] <= 0.0:
        age -= 1
    return age


def token_index(F: np.ndarray, age: int, known: float = 0.0) -> float:
    """The Gittins index, per output token of work, of a job that has generated ``age`` tokens and must
    first do ``known`` tokens' worth of work that cannot end it: max over b > age of
    (F(age) - F(b)) / (known F(age) + sum_{t=age}^{b-1} F(t)). 0 where F(age) = 0."""
    if F[age] <= 0.0:
        return 0.0
    area = np.cumsum(F[age:-1])                                  # area[i] = sum_{t=age}^{age+i} F(t)
    return float(np.max((F[age] - F[age + 1:]) / (known * F[age] + area)))
