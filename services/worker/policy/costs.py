"""Running estimates of what a step costs, with their uncertainty, from the engine's measurements.

- **Base step** seconds per batch size (tokens in the step), from steps that ran no LoRA delta
  (merged steps, or batches of base-model requests): a decayed mean and variance per token count
  up to ``EXACT_TOKENS`` (decode batches, where the policy compares candidates a few tokens
  apart), per power-of-two bucket above it, interpolated linearly in tokens between them; plus
  seconds per **context token** (KV entries the step's sequences attend), fitted with the LoRA
  overhead below. A step's KV read grows with its sequences' lengths whatever their number: on
  an H200 at 7B widths half a MiB a token, a third of a decode step at 900-token contexts. Keyed
  by tokens alone, the merged epochs' base steps (the hot adapter's few, short requests) were the
  yardstick for unmerged steps of long ones, and the difference was fitted as LoRA's: 0.075 per
  segment against a true 0.005 under the H200 roofline, and dLoRA 18 % slower than
  unmerged-only (issue 21's ablation).
- **LoRA overhead** as a fraction of the base step, ``a · segments + b · rank_tokens / tokens``
  (and the context's, ``κ · Δcontext / base``: a step attending more than the base steps it is
  compared with, κ seconds per million context tokens more, added to the step's seconds, not
  multiplied by its LoRA; base steps themselves teach κ by how far each lies from its size's
  mean as its context does; only sizes of ``EXACT_TOKENS`` or fewer teach it, whose steps all
  feed as many tokens):
  ``segments`` counts the distinct adapters whose deltas ran (a fixed cost per adapter and layer:
  launches, and reading its weights), ``rank_tokens`` sums over tokens the ranks their deltas ran
  at (the FLOPs). The same formula prices unmerged and mixed steps: a mixed step's merged
  adapter's tokens carry no rank, every other token carries its own plus the merged adapter's
  (the correction). Fitted by decayed least squares, pulled towards a prior where the
  observations do not pin a coefficient down (ridge), with the residuals' decayed variance.
- **Merge and unmerge** seconds: decayed mean and variance, over all and per adapter rank (a merge
  multiplies B·A, whose work grows with the rank: a trial's rank-512 switch took 1.6 s on this
  CPU against 47 ms steps); a rank not measured yet is priced at the mean over all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_ALPHA = 0.2  # weight of the newest sample in the running means and variances
_CLIP, _CLIP_AFTER, _CLIP_FLOOR = 3.0, 4, 0.1  # samples clipped to mean ± 3 std once 4 are in (Estimate)
_DECAY = 0.98  # per observation, for the overhead fit
_MILLION = 1e-6  # κ is in seconds per million context tokens: of the order of a and b's scale
# Per base step, for what base steps teach κ: kept apart from the LoRA steps' sums, which decay
# per step with LoRA (on a replica that mostly runs LoRA they would keep ~50 steps of it, and κ
# read 15-50x low in a review's cluster run).
_BASE_DECAY = 0.998
_FIT_LEN = 12  # the fit's sums (``CostModel._fit``)
# Until the fit has seen enough: a few percent per adapter, and per 16 of rank on every token.
PRIOR_A, PRIOR_B = 0.05, 0.02 / 16
# How strongly the fit is pulled to the prior (the ridge penalty on each coefficient's distance
# from it; rank-tokens per token run 8-64, so the prior on b yields after a few observations, the
# one on a after a few more).
_RIDGE = 1.0
# And κ to 0, weakly: its regressor is small where contexts differ little (a decode batch grows a
# few tokens a step: z ~ 0.01-0.05), and at _RIDGE it read a third of the truth there.
_RIDGE_CONTEXT = 0.01
FIT_MIN = 8.0  # observations the fit needs before the policy prices LoRA by it ...
EXPLORE_STEPS = 96  # ... or steps with LoRA seen, after which the fit (and its prior) must do


EXACT_TOKENS = 64


def _bucket(tokens: int) -> int:
    if tokens <= EXACT_TOKENS:
        return tokens if tokens > 1 else 1
    return 1 << math.ceil(math.log2(tokens))


@dataclass
class Estimate:
    """An exponentially weighted mean and variance (West's incremental form, weight ``_ALPHA``),
    robust to outliers: once a few samples are in, each is clipped to within ``_CLIP`` standard
    deviations of the mean (at least ``_CLIP_FLOOR`` of it, so a run of equal samples cannot
    freeze it), so one stalled step (5x its usual time) moves the mean by at most ``_ALPHA *
    _CLIP`` deviations, while a lasting change still gets through in a few steps (and, meanwhile,
    the policy's watchdog sees the steps overrun their predictions)."""

    mean: float
    var: float = 0.0
    n: int = 1
    # Of a step estimate: the mean context tokens of its steps, under the same weights as ``mean``.
    context: float = 0.0

    def add(self, x: float, context: float = 0.0, floor: float | None = None) -> float:
        """Take in ``x`` (of a step attending ``context`` tokens); its deviation from the mean
        before, as clipped (at least ``floor`` from the mean; None: a tenth of the mean, by
        ``_CLIP_FLOOR``). The mean context moves by the share of its own deviation that the
        time's clipped deviation is of the time's: a bucket whose contexts jump keeps its mean
        the time at its mean context (a review: the time held back by the clip, the context not,
        and the pair priced a 16k-token step at 5.3 ms against a true 6.9)."""
        raw = x - self.mean
        if self.n >= _CLIP_AFTER:  # std is sqrt(var) past the first sample
            # max and min written out: a simulated hour adds a million samples
            spread = _CLIP * math.sqrt(self.var)
            least = _CLIP_FLOOR * abs(self.mean) if floor is None else floor
            limit = spread if spread >= least else least
            if x < self.mean - limit:
                x = self.mean - limit
            elif x > self.mean + limit:
                x = self.mean + limit
        d = x - self.mean
        self.mean += _ALPHA * d
        self.var = (1 - _ALPHA) * (self.var + _ALPHA * d * d)
        self.context += _ALPHA * (context - self.context) * (d / raw if raw else 1.0)
        self.n += 1
        return d

    @property
    def std(self) -> float:
        """Spread of one observation; before two are seen, a quarter of the mean (a guess)."""
        return math.sqrt(self.var) if self.n > 1 else 0.25 * abs(self.mean)

    @property
    def sem(self) -> float:
        """Standard error of the mean: the weights (1-α)^k·α of the average sum in square to
        α/(2-α), about one ninth at α = 0.2 (fewer samples: std/√n)."""
        return self.std * math.sqrt(max(_ALPHA / (2 - _ALPHA), 1 / self.n))

    def to_list(self) -> list[float]:
        return [self.mean, self.var, self.n, self.context]

    @classmethod
    def from_list(cls, v: list[float]) -> Estimate:
        return cls(float(v[0]), float(v[1]), int(v[2]), float(v[3]))


def _add(e: Estimate | None, x: float, context: float = 0.0, floor: float | None = None) -> Estimate:
    if e is None:
        return Estimate(x, context=context)
    e.add(x, context, floor)
    return e


def _lookup(table: dict[int, Estimate], tokens: int, extrapolate: bool, span: float = math.inf) -> Estimate | None:
    """The estimate for ``tokens`` in ``table`` (bucket -> seconds): its bucket's, else
    interpolated linearly in tokens between the nearest buckets (at most ``span`` times apart),
    else (``extrapolate``) the nearest scaled linearly in tokens, a safe upper bound above (steps
    grow at most linearly) and a fair guess below, half as sure; None where there is none."""
    b = _bucket(tokens)
    if b in table:
        return table[b]
    lower = [k for k in table if k < b]
    upper = [k for k in table if k > b]
    if lower and upper and min(upper) <= span * max(lower):
        lo_k, hi_k = max(lower), min(upper)
        lo, hi = table[lo_k], table[hi_k]
        w = (b - lo_k) / (hi_k - lo_k)
        context = lo.context * (1 - w) + hi.context * w
        return Estimate(lo.mean * (1 - w) + hi.mean * w, max(lo.var, hi.var), min(lo.n, hi.n), context)
    if not extrapolate or not table or (lower and upper):
        return None
    k = max(lower) if lower else min(upper)
    f = b / k if lower else max(b / k, 0.5)
    near = table[k]
    return Estimate(near.mean * f, 4 * near.var * f * f, max(2, near.n), near.context * f)


_SUBSETS = ((0, 1), (0, 2), (1, 2), (0,), (1,), (2,), ())


def _solve_on(m: list[list[float]], v: list[float], free: tuple[int, ...]) -> list[float]:
    """The solution of m·x = v over the coordinates in ``free`` (m symmetric, positive definite),
    the others 0: Cramer's rule on the 1x1, 2x2 or 3x3 system."""
    x = [0.0, 0.0, 0.0]
    if len(free) == 1:
        (i,) = free
        x[i] = v[i] / m[i][i]
    elif len(free) == 2:
        i, j = free
        det = m[i][i] * m[j][j] - m[i][j] * m[i][j]
        x[i], x[j] = (m[j][j] * v[i] - m[i][j] * v[j]) / det, (m[i][i] * v[j] - m[i][j] * v[i]) / det
    elif len(free) == 3:  # symmetric: [[a, b, c], [b, d, e], [c, e, f]]
        (a, b, c), (_, d, e), (_, _, f) = m
        v0, v1, v2 = v
        det = a * (d * f - e * e) - b * (b * f - e * c) + c * (b * e - d * c)
        x[0] = (v0 * (d * f - e * e) - b * (v1 * f - e * v2) + c * (v1 * e - d * v2)) / det
        x[1] = (a * (v1 * f - e * v2) - v0 * (b * f - e * c) + c * (b * v2 - v1 * c)) / det
        x[2] = (a * (d * v2 - v1 * e) - b * (b * v2 - v1 * c) + v0 * (b * e - d * c)) / det
    return x


@dataclass
class CostModel:
    base: dict[int, Estimate] = field(default_factory=dict)  # bucket -> seconds, from steps without LoRA
    # bucket -> seconds of the base step, from steps with LoRA divided by their estimated factor:
    # where no step without LoRA ran at that size (an unmerged replica rarely runs one), the
    # prior and the fit say what the base step took.
    inferred: dict[int, Estimate] = field(default_factory=dict)
    merge: Estimate | None = None
    unmerge: Estimate | None = None
    merges: dict[int, Estimate] = field(default_factory=dict)  # rank -> seconds of a merge of that rank
    unmerges: dict[int, Estimate] = field(default_factory=dict)  # and of an unmerge
    # Decayed sums of the overhead fit y = a·s + b·r + κ·z (s segments, r rank-tokens per token,
    # z the context beyond the base step's in millions over its seconds), n counting steps with
    # LoRA; then the base steps' Σzz and Σzy (with s = r = 0: κ's alone).
    _fit: list[float] = field(default_factory=lambda: [0.0] * _FIT_LEN)  # n Σss Σsr Σrr Σsy Σry Σsz Σrz Σzz Σzy + 2
    _resid: Estimate | None = None  # of the fit's relative residual
    lora_steps: int = 0  # steps with LoRA observed
    _coefficients: tuple[float, float, float] | None = field(default=None, init=False, repr=False, compare=False)
    # ``inferred | base``, made again only after ``observe_step`` added a bucket to either (none is
    # taken out; the estimates in it are the same objects, updated in place): every candidate
    # the policy prices, and every step it observes, looks a step up in it.
    _table: dict[int, Estimate] | None = field(default=None, init=False, repr=False, compare=False)

    # ---- observations ---------------------------------------------------------------------
    def observe_step(
        self, tokens: int, seconds: float, segments: int = 0, rank_tokens: int = 0, context: int = 0
    ) -> None:
        """One step's measured seconds, its ``tokens``, the LoRA it ran and the ``context`` tokens
        its sequences attended (see the module doc)."""
        key = _bucket(tokens)
        if segments == 0:
            e = self.base.get(key)
            if e is None:
                self.base[key] = Estimate(seconds, context=context)
                self._table = None
                return
            # How far it lies from its size's mean, as its context does (as far as a clip let it).
            # Only where the size is its exact token count: a power-of-two bucket holds steps up
            # to twice as long, whose contexts grow with the tokens fed, and κ took in their cost.
            mean, dx, raw = e.mean, context - e.context, seconds - e.mean
            d = e.add(seconds, context)
            if tokens <= EXACT_TOKENS:
                z, y = dx * (d / raw if raw else 1.0) * _MILLION / mean, d / mean
                f = self._fit
                f[10] = _BASE_DECAY * f[10] + z * z
                f[11] = _BASE_DECAY * f[11] + z * y
                self._coefficients = None
            return
        if tokens <= 0:
            return
        self.lora_steps += 1
        direct = _lookup(self.base, tokens, extrapolate=False, span=2.0)
        # The fit learns only against measured base steps (never circular), of about its size: a
        # step's time is not linear in tokens from one decode to a 256-token prefill, and the 8 %
        # an interpolation between them was off, against an overhead of 1 %, read as LoRA's
        # (0.014 a segment against a true 0.002-0.004: the H200 roofline at stride 32).
        if direct is not None:
            y = seconds / direct.mean - 1.0
            s, r, z = float(segments), rank_tokens / tokens, (context - direct.context) * _MILLION / direct.mean
            a, b, k = self._solved()
            resid = y - a * s - b * r - k * z
            y += self._clipped(resid) - resid
            # clipped as the fit takes it (a floor of a tenth of the base step, not of the residuals'
            # mean, ~0: their spread could then never grow, and the fit never followed a change)
            self._resid = _add(self._resid, resid, floor=_CLIP_FLOOR)
            if tokens > EXACT_TOKENS:  # (as above) κ as known: the context's share taken out, not taught
                y, z = y - k * z, 0.0
            d, f = _DECAY, self._fit
            for i, v in enumerate((1.0, s * s, s * r, r * r, s * y, r * y, s * z, r * z, z * z, z * y)):
                f[i] = d * f[i] + v
            self._coefficients = None
        if key not in self.inferred:
            self._table = None
        base = seconds / self._mean_factor(tokens, segments, rank_tokens)
        self.inferred[key] = _add(self.inferred.get(key), base, context)

    def _clipped(self, resid: float) -> float:
        """A LoRA step's residual ``resid`` (relative to its base step) as the fit takes it in: once
        ``_CLIP_AFTER`` residuals are in, within ``_CLIP`` of their standard deviations of their
        mean, at least ``_CLIP_FLOOR`` (a tenth of the base step). As ``Estimate`` clips its
        samples: one stalled step at 4x its prediction moved a young fit's ``a`` from 0.05 to
        0.59 (about nine observations in), where a lasting change still gets through in a few
        steps as the residuals' spread grows."""
        r = self._resid
        if r is None or r.n < _CLIP_AFTER:
            return resid
        limit = max(_CLIP * r.std, _CLIP_FLOOR)
        return min(max(resid, r.mean - limit), r.mean + limit)

    def observe_switch(
        self, merge: float | None = None, unmerge: float | None = None, merge_rank: int = 0, unmerge_rank: int = 0
    ) -> None:
        """Seconds of a merge and/or an unmerge, of adapters of those ranks (0: not known)."""
        if merge is not None:
            self.merge = _add(self.merge, merge)
            if merge_rank:
                self.merges[merge_rank] = _add(self.merges.get(merge_rank), merge)
        if unmerge is not None:
            self.unmerge = _add(self.unmerge, unmerge)
            if unmerge_rank:
                self.unmerges[unmerge_rank] = _add(self.unmerges.get(unmerge_rank), unmerge)

    # ---- estimates ------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """Whether LoRA can be priced: the overhead fit has seen enough steps against measured base
        steps (``FIT_MIN``, decayed count), or ``EXPLORE_STEPS`` steps with LoRA went by without
        (a replica whose batches never run without LoRA), and the prior must do."""
        return self._fit[0] >= FIT_MIN or self.lora_steps >= EXPLORE_STEPS

    def coefficients(self) -> tuple[float, float]:
        """(a, b) of the overhead fit: ridge towards (PRIOR_A, PRIOR_B)."""
        return self._solved()[:2]

    @property
    def context_slope(self) -> float:
        """Seconds a step takes per context token beyond those of the base steps it rests on (>= 0)."""
        return self._solved()[2] * _MILLION

    def _solved(self) -> tuple[float, float, float]:
        """(a, b, κ), solved again only after the fit changed: every candidate step the policy
        prices asks for them."""
        if self._coefficients is None:
            self._coefficients = self._solve()
        return self._coefficients

    def _solve(self) -> tuple[float, float, float]:
        """Ridge least squares towards (PRIOR_A, PRIOR_B, 0), none of a, b, κ below 0 (a step
        cannot get cheaper for running LoRA or attending more). Where the free solution has one
        below, the least squares over every subset held at 0 whose own solution is not (three
        coefficients: eight subsets; the best of those is the constrained optimum, the problem
        being convex). A review: b clamped alone left a at 0.048 where the truth was 0.008."""
        _, ss, sr, rr, sy, ry, sz, rz, zz, zy, base_zz, base_zy = self._fit
        m = [[ss + _RIDGE, sr, sz], [sr, rr + _RIDGE, rz], [sz, rz, zz + base_zz + _RIDGE_CONTEXT]]
        v = [sy + _RIDGE * PRIOR_A, ry + _RIDGE * PRIOR_B, zy + base_zy]
        x = _solve_on(m, v, (0, 1, 2))
        if min(x) >= 0:
            return x[0], x[1], x[2]

        def loss(x: list[float]) -> float:  # x'mx - 2v'x: the squares up to a constant
            return sum(x[i] * m[i][j] * x[j] for i in range(3) for j in range(3)) - 2 * sum(map(float.__mul__, v, x))

        feasible = [y for free in _SUBSETS if min(y := _solve_on(m, v, free)) >= 0]
        a, b, k = min(feasible, key=loss)  # the empty subset (all 0) is always among them
        return a, b, k

    def at_context(self, e: Estimate, context: int | None, factor: float = 1.0) -> float:
        """Seconds of ``e``'s step times the LoRA ``factor``, at ``context`` tokens (None: its
        steps' mean context): the context's seconds added, as fitted (y = o + κ·z, not (1 + o)
        times them); never below a tenth of the step at its mean context (a slope read off long
        contexts, priced at a short one)."""
        seconds = e.mean * factor
        if context is None:
            return seconds
        slope = self.context_slope
        return seconds if not slope else max(seconds + slope * (context - e.context), 0.1 * seconds)

    def overhead(self, segments: int, rank_tokens_per_token: float) -> float:
        """Step time with that LoRA over the base step's, minus one."""
        if segments <= 0:
            return 0.0
        a, b = self.coefficients()
        return a * segments + b * rank_tokens_per_token

    @staticmethod
    def key(tokens: int) -> int:
        """Which base estimate a step of ``tokens`` tokens rests on."""
        return _bucket(tokens)

    def base_estimate(self, tokens: int, context: int | None = None) -> Estimate | None:
        """Seconds of a base step of ``tokens`` tokens attending ``context`` tokens (None: as many
        as the steps measured at that size did); None before any measurement. Measured steps
        without LoRA first, inferred ones where none ran at that size."""
        if self._table is None:
            self._table = self.inferred | self.base
        e = _lookup(self._table, tokens, extrapolate=True)
        if e is None or context is None:
            return e
        return Estimate(self.at_context(e, context), e.var, e.n, context)

    def base_seconds(self, tokens: int, context: int | None = None) -> float | None:
        e = self.base_estimate(tokens, context)
        return None if e is None else e.mean

    def factor(self, tokens: int, segments: int = 0, rank_tokens: int = 0) -> tuple[float, float]:
        """(mean, standard error) of step time with that LoRA over the base step's: 1 + the
        overhead; the error from the fit's residuals (half the overhead before any is seen)."""
        if segments == 0 or tokens <= 0:
            return 1.0, 0.0
        overhead = self.overhead(segments, rank_tokens / tokens)
        return 1.0 + overhead, self._resid.sem if self._resid is not None else 0.5 * overhead

    def _mean_factor(self, tokens: int, segments: int, rank_tokens: int) -> float:
        """``factor``'s mean alone (its error is a square root and more, on every step priced)."""
        return 1.0 if segments == 0 or tokens <= 0 else 1.0 + self.overhead(segments, rank_tokens / tokens)

    def step_seconds(
        self, tokens: int, segments: int = 0, rank_tokens: int = 0, context: int | None = None
    ) -> float | None:
        """Estimated seconds of a step of ``tokens`` tokens running that LoRA, attending ``context``
        tokens (None: as many as measured steps of that size did); None before any base step was
        measured. (``base_estimate`` inlined: the policy asks at every step it observes, a
        million times in a simulated hour.)"""
        if self._table is None:
            self._table = self.inferred | self.base
        base = _lookup(self._table, tokens, extrapolate=True)
        if base is None:
            return None
        return self.at_context(base, context, self._mean_factor(tokens, segments, rank_tokens))

    @property
    def merge_seconds(self) -> float | None:
        return self.merge.mean if self.merge else None

    @property
    def unmerge_seconds(self) -> float | None:
        return self.unmerge.mean if self.unmerge else None

    def switch_seconds(
        self, merge: bool = True, unmerge: bool = True, merge_rank: int = 0, unmerge_rank: int = 0
    ) -> tuple[float, float]:
        """(mean, standard error) seconds of a merge and/or an unmerge of adapters of those ranks
        (0: not known), each at its rank's measure, else the mean over all (0 for one never measured)."""
        parts = [
            by_rank.get(rank) or overall
            for overall, by_rank, rank, on in (
                (self.merge, self.merges, merge_rank, merge),
                (self.unmerge, self.unmerges, unmerge_rank, unmerge),
            )
            if on
        ]
        return sum(e.mean for e in parts if e), math.sqrt(sum(e.sem**2 for e in parts if e))

    # ---- checkpoint -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "base": {str(k): v.to_list() for k, v in self.base.items()},
            "inferred": {str(k): v.to_list() for k, v in self.inferred.items()},
            "merge": self.merge.to_list() if self.merge else None,
            "unmerge": self.unmerge.to_list() if self.unmerge else None,
            "fit": list(self._fit),
            "resid": self._resid.to_list() if self._resid else None,
            "lora_steps": self.lora_steps,
            "merges": {str(k): v.to_list() for k, v in self.merges.items()},
            "unmerges": {str(k): v.to_list() for k, v in self.unmerges.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        """From ``to_dict``; a checkpoint of another shape (an older release's) starts afresh."""
        try:
            fit = [float(x) for x in d.get("fit", [0.0] * _FIT_LEN)]
            if len(fit) != _FIT_LEN:  # (an older one's base steps know no context)
                return cls()
            return cls(
                base={int(k): Estimate.from_list(v) for k, v in d.get("base", {}).items()},
                inferred={int(k): Estimate.from_list(v) for k, v in d.get("inferred", {}).items()},
                merge=Estimate.from_list(d["merge"]) if d.get("merge") else None,
                unmerge=Estimate.from_list(d["unmerge"]) if d.get("unmerge") else None,
                _fit=fit,
                _resid=Estimate.from_list(d["resid"]) if d.get("resid") else None,
                # (a restart explored again before pricing LoRA by the prior: ``fitted``)
                lora_steps=int(d.get("lora_steps", 0)),
                merges={int(k): Estimate.from_list(v) for k, v in d.get("merges", {}).items()},
                unmerges={int(k): Estimate.from_list(v) for k, v in d.get("unmerges", {}).items()},
            )
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            return cls()
