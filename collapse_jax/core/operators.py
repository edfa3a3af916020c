"""Data operators: what acts between "sample from model n" and "train model n + 1", written once
for every family they apply to — curation (best-of-K by Bradley–Terry with a reward),
verification (an imperfect verifier with true- and false-positive rates), temperature and
top-k / top-p truncation of the fitted model, and weighted fresh real data.

The loop of ``ARCHITECTURE.md`` becomes ``new = operators(sample(model_n, M_n))`` before the data
policy. Two representations are served:

* **categorical** laws (the discrete family, exact counts): each operator maps the fitted p to
  another categorical law p̃ from which the M_n samples are drawn exactly as one multinomial
  (:func:`categorical`): temperature p^{1/τ}, top-k / top-p truncation, curation
  p̃(i) = p(i) H_K(i) (:func:`curation_factor`, the one-dimensional integral computed by
  quadrature) and verification p̃ ∝ p·(tpr on good states, fpr on bad ones);
* **points** (GMM, KDE, user families, the Gaussian ``samples`` sampler): :func:`point_samples`
  draws K candidates per kept point and keeps one by a Gumbel-max draw (exactly the
  Bradley–Terry choice), and gives each kept point V verifier tries (the first accepted candidate
  is kept; a point with none accepted is dropped: weight 0). For a Gaussian model the K → ∞ limit
  of curation with a linear or quadratic reward is again Gaussian (:func:`tilt_gaussian`).

Configs: every generational study carries :class:`OperatorFields` (one flag each, from
``core/flags.py``); :func:`parse` validates them at the boundary into a frozen
:class:`Operators` (one-line ``ConfigError`` naming the value) and refuses an operator the family
cannot take (:func:`check_supported`). With every operator off a family runs exactly its old code
path (same random stream, same numbers). Derivations: ``theory/operators.md``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from collapse_jax.core.errors import ConfigError, check_float, check_int, load_array
from collapse_jax.core.operator_laws import (  # noqa: F401  (the laws, re-exported)
    MAX_REWARD_SPREAD,
    candidates_per_example,
    categorical,
    curation_factor,
    point_samples,
    select_indices,
    temper,
    temper_mixture,
    tilt,
    tilt_gaussian,
    truncate,
)

#: Operator names as the reports, the refusals and the config keys spell them.
OPERATORS = ("curate", "verify", "temperature", "top_k", "top_p", "real_weight")
#: What every family whose data are points takes through :func:`point_samples`.
POINT_OPERATORS = ("curate", "verify")
#: A mixture family also takes the sampling-bias operators on its components
#: (:func:`temper_mixture`).
MIXTURE_OPERATORS = ("curate", "verify", "temperature", "top_k", "top_p")
#: Point families whose K → ∞ curation law has a closed form (:func:`tilt_gaussian`).
TILTABLE = ("gaussian",)


@dataclasses.dataclass(frozen=True)
class OperatorFields:
    """The operator fields of every generational study (base class of its ``Config``)."""

    curate: str = "off"  # best-of-K curation: off | K (candidates per kept sample) | inf (K → ∞)
    reward: str = ""  # curation reward: per-state vector or .npy (discrete); linear:B1,..,Bd or quadratic:A:C1,..,Cd (points)
    verify: str = "off"  # imperfect verifier: off | TPR,FPR (accept rates on good and bad samples)
    good: str = ""  # what the verifier calls correct: states I,J,A-B (discrete); halfspace:A1,..,Ad:C or ball:R:C1,..,Cd (points)
    verify_draws: int = 16  # points: verifier tries per kept point (none accepted: dropped)
    temperature: float = 1.0  # τ: sample from p^{1/τ} (1 = off)
    top_k: int = 0  # keep the k most probable states before sampling (0 = off)
    top_p: float = 1.0  # keep the smallest set of most probable states with mass >= top_p (1 = off)
    real_weight: float = (
        0.0  # w: weight of n fresh real points against m = n/k synthetic ones (0 = off)
    )
    real_ratio: float = 1.0  # k: real points per synthetic point under real_weight (m = round(n/k))


# --------------------------------------------------------------------------------------------
# Parsed operators


def _rows(v: jax.Array, x: jax.Array) -> jax.Array:
    """``v`` (d,) shaped to broadcast against the points ``x`` (..., d)."""
    return v.reshape((1,) * (x.ndim - 1) + v.shape)


@dataclasses.dataclass(frozen=True)
class PointReward:
    """r(x) = bᵀx (``linear``) or r(x) = −(a/2)‖x − c‖² (``quadratic``)."""

    kind: str  # linear | quadratic
    scale: float  # a of the quadratic (0 for linear)
    vector: tuple[float, ...]  # b (linear) or the centre c (quadratic)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "..."]:
        v = jnp.asarray(self.vector, x.dtype)
        if self.kind == "linear":
            return x @ v
        return -0.5 * self.scale * jnp.sum((x - _rows(v, x)) ** 2, axis=-1)

    def natural(self) -> tuple[float, np.ndarray]:
        """(a, b) of r(x) = bᵀx − (a/2)‖x‖² + const."""
        v = np.asarray(self.vector, np.float64)
        return (0.0, v) if self.kind == "linear" else (self.scale, self.scale * v)


@dataclasses.dataclass(frozen=True)
class Region:
    """The verifier's correct samples: {aᵀx >= c} (``halfspace``) or {‖x − c‖ <= r} (``ball``)."""

    kind: str  # halfspace | ball
    vector: tuple[float, ...]  # a (half-space normal) or c (ball centre)
    value: float  # c (half-space offset) or r (ball radius)

    def contains(self, x: Float[Array, "... d"]) -> jax.Array:
        v = jnp.asarray(self.vector, x.dtype)
        if self.kind == "halfspace":
            return x @ v >= self.value
        return jnp.sum((x - _rows(v, x)) ** 2, axis=-1) <= self.value**2


@dataclasses.dataclass(frozen=True)
class SequenceReward:
    """A reward on token sequences: the number of tokens in a set (``tokens``) or of tokens that
    are not padding (``length``)."""

    kind: str  # tokens | length
    tokens: tuple[int, ...] = ()  # the rewarded token ids (kind tokens)

    def __call__(self, seqs: np.ndarray, pad_id: int) -> np.ndarray:
        if self.kind == "tokens":
            return np.isin(seqs, self.tokens).sum(1).astype(np.float64)
        return (seqs != pad_id).sum(1).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class ClassReward:
    """r(x) = scale · (classifier logit of class ``digit``) (the VAE's images)."""

    digit: int  # the rewarded class
    scale: float = 1.0  # multiplies the logit


@dataclasses.dataclass(frozen=True)
class ClassCheck:
    """A sample is correct when the classifier assigns it one of ``classes``."""

    classes: tuple[int, ...]  # the correct classes


@dataclasses.dataclass(frozen=True)
class LikelihoodCheck:
    """A sequence is correct when its mean per-token log-likelihood under the known synthetic
    source (given its prompt) is at least ``threshold``."""

    threshold: float  # nats per token


@dataclasses.dataclass(frozen=True)
class Curation:
    """Best-of-K: draw K candidates, keep one with probability ∝ e^{r} (Bradley–Terry)."""

    k: float  # candidates per kept sample (an integer >= 1, or inf: the reward-tilted limit)
    reward: tuple[float, ...] | PointReward  # per-state rewards (categorical) or r(x) (points)


@dataclasses.dataclass(frozen=True)
class Verification:
    """An imperfect verifier: accepts a correct sample with probability tpr, another with fpr."""

    tpr: float  # true-positive rate
    fpr: float  # false-positive rate
    good: tuple[bool, ...] | Region  # correct states (categorical) or region (points)
    draws: int = 16  # points: tries per kept point


@dataclasses.dataclass(frozen=True)
class Operators:
    """The operators of one run (hashable: part of a family's static description)."""

    curate: Curation | None = None  # best-of-K curation
    verify: Verification | None = None  # verifier filter
    temperature: float = 1.0  # τ (1: off)
    top_k: int = 0  # top-k truncation (0: off)
    top_p: float = 1.0  # top-p truncation (1: off)
    real_weight: float = 0.0  # w on fresh real data (0: off)
    real_ratio: float = 1.0  # k: n real points per n/k synthetic ones

    def active(self) -> tuple[str, ...]:
        """The names of the operators that are on (:data:`OPERATORS` order)."""
        on = {
            "curate": self.curate is not None,
            "verify": self.verify is not None,
            "temperature": self.temperature != 1.0,
            "top_k": self.top_k > 0,
            "top_p": self.top_p < 1.0,
            "real_weight": self.real_weight > 0,
        }
        return tuple(name for name in OPERATORS if on[name])

    @property
    def on_categorical(self) -> bool:
        """Whether the categorical law is transformed before sampling."""
        return bool(set(self.active()) - {"real_weight"})

    @property
    def on_points(self) -> bool:
        """Whether model samples go through the point operator (finite-K curation, verify)."""
        finite = self.curate is not None and math.isfinite(self.curate.k)
        return finite or self.verify is not None

    def describe(self) -> list[str]:
        """One line per active operator, for the report."""
        out = []
        if self.curate is not None:
            k = (
                "∞ (the reward-tilted law)"
                if math.isinf(self.curate.k)
                else str(int(self.curate.k))
            )
            r = self.curate.reward
            if isinstance(r, PointReward):
                rtxt = f"{r.kind} reward, a = {r.scale:g}, vector {list(r.vector)}"
            elif isinstance(r, ClassReward):
                rtxt = f"reward {r.scale:g} × classifier logit of class {r.digit}"
            elif isinstance(r, SequenceReward):
                rtxt = f"reward: {r.kind}" + (f" {_short(r.tokens)}" if r.tokens else "")
            else:
                rtxt = f"per-state rewards {_short(r)}"
            out.append(f"curate: best-of-{k} by Bradley–Terry, {rtxt}")
        if self.verify is not None:
            v = self.verify
            g = v.good
            if isinstance(g, Region):
                gtxt = f"{g.kind} {list(g.vector)}, {g.value:g}"
            elif isinstance(g, ClassCheck):
                gtxt = f"classifier label in {list(g.classes)}"
            elif isinstance(g, LikelihoodCheck):
                gtxt = f"source log-likelihood >= {g.threshold:g} nats per token"
            else:
                gtxt = f"{sum(g)} good states of {len(g)}"
            tries = f", {v.draws} tries per point" if not isinstance(g, tuple) else ""
            out.append(f"verify: tpr {v.tpr:g}, fpr {v.fpr:g}, correct = {gtxt}{tries}")
        if self.temperature != 1.0:
            out.append(f"temperature: τ = {self.temperature:g}")
        if self.top_k > 0:
            out.append(f"top-k: k = {self.top_k}")
        if self.top_p < 1.0:
            out.append(f"top-p: p = {self.top_p:g}")
        if self.real_weight > 0:
            out.append(
                f"real-weight: w = {self.real_weight:g} on n fresh real points, "
                f"m = n/{self.real_ratio:g} synthetic"
            )
        return out


#: Every operator off (the default of every family).
NONE = Operators()


def _short(v) -> str:
    v = list(v)
    return str([round(x, 4) for x in v]) if len(v) <= 8 else f"[{v[0]:.4g}, …] ({len(v)} states)"


# --------------------------------------------------------------------------------------------
# Validation at the boundary


def check_supported(family: str, ops: Operators, supported) -> None:
    """Refuse an operator the family cannot take (one line naming the family and operator)."""
    for name in ops.active():
        if name not in supported:
            raise ConfigError(
                f"the {family} family cannot take the {name} operator ({_value_of(ops, name)}); "
                f"it takes {', '.join(supported) or 'no operator'}"
            )


def _value_of(ops: Operators, name: str) -> str:
    if name == "curate":
        return f"curate {ops.curate.k:g}"
    if name == "verify":
        return f"verify {ops.verify.tpr:g},{ops.verify.fpr:g}"
    return f"{name} {getattr(ops, name):g}"


def parse(
    config,
    family: str,
    supported,
    *,
    states: int | None = None,
    dim: int | None = None,
    sequences: bool = False,
    classes: int | None = None,
):
    """The :class:`Operators` of a config carrying :class:`OperatorFields`.

    ``states`` (K) is given by categorical families, ``dim`` (d) by point families and
    ``sequences`` by the language model, ``classes`` (number of classes) by the VAE; they fix
    how ``reward`` and ``good`` are read. Raises a one-line ConfigError naming a bad value, and
    refuses the operators not in ``supported`` for ``family``.
    """
    c = config
    temperature = check_float("temperature", c.temperature, 0.0, open_min=True)
    top_k = check_int("top_k", c.top_k, 0)
    top_p = check_float("top_p", c.top_p, 0.0, 1.0, open_min=True)
    real_weight = check_float("real_weight", c.real_weight, 0.0, 1.0)
    real_ratio = check_float("real_ratio", c.real_ratio, 0.0, open_min=True)
    draws = check_int("verify_draws", c.verify_draws, 1, 4096)
    raw = {  # refuse what the family cannot take before reading family-specific specs
        "curate": str(c.curate).strip() != "off",
        "verify": str(c.verify).strip() != "off",
        "temperature": temperature != 1.0,
        "top_k": top_k > 0,
        "top_p": top_p < 1.0,
        "real_weight": real_weight > 0,
    }
    detail = {"curate": "reward", "verify": "good"}  # named too: they are part of the operator
    for name in OPERATORS:
        if raw[name] and name not in supported:
            extra = detail.get(name)
            given = f", {extra} {getattr(c, extra)!r}" if extra and str(getattr(c, extra)) else ""
            raise ConfigError(
                f"the {family} family cannot take the {name} operator ({name} "
                f"{getattr(c, name)}{given}); it takes {', '.join(supported) or 'no operator'}"
            )
    if states is not None and top_k > states:
        raise ConfigError(f"top_k {top_k} exceeds the {states} states")
    curate = _curation(c.curate, c.reward, states, dim, sequences, classes)
    verify = _verification(c.verify, c.good, states, dim, draws, sequences, classes)
    if curate is None and str(c.reward).strip():
        raise ConfigError(f"reward {c.reward!r} is given but curate is off; set curate K or inf")
    if verify is None and str(c.good).strip():
        raise ConfigError(f"good {c.good!r} is given but verify is off; set verify TPR,FPR")
    if real_weight == 0 and real_ratio != 1.0:
        raise ConfigError(f"real_ratio {real_ratio:g} is given but real_weight is off (0)")
    ops = Operators(curate, verify, temperature, top_k, top_p, real_weight, real_ratio)
    check_supported(family, ops, supported)
    if ops.curate is not None and math.isinf(ops.curate.k) and states is None:
        if family not in TILTABLE:
            raise ConfigError(
                f"the {family} family cannot take the curate inf operator (the K → ∞ law has no "
                "closed form here); use a finite K"
            )
    return ops


def _curation(spec, reward, states, dim, sequences=False, classes=None) -> Curation | None:
    text = str(spec).strip()
    if text == "off":
        return None
    if text == "inf":
        k = math.inf
    else:
        try:
            k = int(text)
        except ValueError:
            raise ConfigError(f"curate {spec!r} must be off, an integer K >= 1 or inf") from None
        if k < 1 or k > 1_000_000:
            raise ConfigError(f"curate {spec!r} must be off, an integer K in 1..1e6, or inf")
    if not str(reward).strip():
        raise ConfigError(f"curate {spec!r} needs a reward (--reward)")
    if sequences:
        return Curation(k, _sequence_reward(reward))
    if classes is not None:
        return Curation(k, _class_reward(reward, classes))
    return Curation(k, _reward(reward, states, dim))


def _class_reward(spec, classes: int) -> ClassReward:
    text = str(spec).strip()
    head, _, rest = text.partition(":")
    digit, _, scale = rest.partition(":")
    if head == "logit" and digit.strip().isdigit() and int(digit) < classes:
        s = check_float(f"reward {text!r} scale", scale, 0.0, open_min=True) if scale else 1.0
        return ClassReward(int(digit), s)
    raise ConfigError(f"reward {text!r} must be logit:D[:SCALE] with a class D in 0..{classes - 1}")


def _sequence_reward(spec) -> SequenceReward:
    text = str(spec).strip()
    head, _, rest = text.partition(":")
    if text == "length":
        return SequenceReward("length")
    if head == "tokens" and rest:
        return SequenceReward("tokens", tuple(sorted(_indices("reward", rest, text))))
    raise ConfigError(f"reward {text!r} must be length or tokens:I,J,A-B (token ids)")


def _indices(name: str, text: str, spec: str, limit: int | None = None) -> set[int]:
    """Integers and ranges ``0,3,5-9`` (below ``limit`` when given); errors name ``spec``."""
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"{name} {spec!r} must be indices like 0,3,5-9") from None
        if a < 0 or b < a or (limit is not None and b >= limit):
            bound = f"0..{limit - 1}" if limit is not None else "0 and above"
            raise ConfigError(f"{name} {spec!r} names indices outside {bound}")
        out.update(range(a, b + 1))
    return out


def _floats(name: str, text: str, what: str, spec: str | None = None) -> tuple[float, ...]:
    """Comma-separated finite numbers ``text`` (part of the value ``spec`` named in errors)."""
    spec = text if spec is None else spec
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} {spec!r}: {what} must be comma-separated numbers") from None
    if not all(math.isfinite(x) for x in v):
        raise ConfigError(f"{name} {spec!r}: {what} must be finite")
    return v


def _reward(spec, states, dim):
    text = str(spec).strip()
    head, _, rest = text.partition(":")
    if states is not None:  # a reward per state
        if text.endswith(".npy") and Path(text).suffix == ".npy":
            r = tuple(float(x) for x in load_array("reward", text, ndim=(1,)))
        else:
            r = _floats("reward", text, "per-state rewards")
        if len(r) != states:
            raise ConfigError(f"reward {text!r} has {len(r)} entries but there are {states} states")
        if not all(math.isfinite(x) for x in r):
            raise ConfigError(f"reward {text!r} must be finite")
        if max(r) - min(r) > MAX_REWARD_SPREAD:
            raise ConfigError(
                f"reward {text!r} spreads over {max(r) - min(r):g} > {MAX_REWARD_SPREAD:g} nats"
            )
        return r
    if head == "linear":
        b = _floats("reward", rest, "linear:B1,..,Bd", text)
        if dim is not None and len(b) != dim:
            raise ConfigError(
                f"reward {text!r} has {len(b)} coefficients, the data dimension is {dim}"
            )
        return PointReward("linear", 0.0, b)
    if head == "quadratic":
        a_text, _, c_text = rest.partition(":")
        a = check_float(f"reward {text!r} curvature", a_text, 0.0, open_min=True)
        return PointReward(
            "quadratic", a, _centre("reward", c_text, "quadratic:A:C1,..,Cd", text, dim)
        )
    raise ConfigError(f"reward {text!r} must be linear:B1,..,Bd or quadratic:A:C1,..,Cd")


def _centre(name: str, c_text: str, form: str, text: str, dim) -> tuple[float, ...]:
    """The centre point of a ``quadratic`` reward or a ``ball`` region, d coordinates."""
    c = _floats(name, c_text, form, text)
    if dim is not None and len(c) != dim:
        raise ConfigError(
            f"{name} {text!r} has a centre of {len(c)} coordinates, the data dimension is {dim}"
        )
    return c


def _verification(
    spec, good, states, dim, draws, sequences=False, classes=None
) -> Verification | None:
    text = str(spec).strip()
    if text == "off":
        return None
    rates = _floats("verify", text, "TPR,FPR")
    if len(rates) != 2 or not all(0.0 <= x <= 1.0 for x in rates) or sum(rates) <= 0:
        raise ConfigError(f"verify {text!r} must be TPR,FPR in [0, 1], not both 0")
    if not str(good).strip():
        raise ConfigError(f"verify {text!r} needs the correct samples (--good)")
    if sequences:
        return Verification(rates[0], rates[1], _likelihood_check(good), draws)
    if classes is not None:
        text = str(good).strip()
        head, _, rest = text.partition(":")
        if head != "classes" or not rest:
            raise ConfigError(f"good {text!r} must be classes:I,J,A-B (classifier labels)")
        chosen = tuple(sorted(_indices("good", rest, text, classes)))
        return Verification(rates[0], rates[1], ClassCheck(chosen), draws)
    return Verification(rates[0], rates[1], _good(good, states, dim), draws)


def _likelihood_check(spec) -> LikelihoodCheck:
    text = str(spec).strip()
    head, _, rest = text.partition(":")
    if head != "loglik" or not rest:
        raise ConfigError(f"good {text!r} must be loglik:T (mean log-likelihood per token >= T)")
    return LikelihoodCheck(check_float(f"good {text!r} threshold", rest))


def _good(spec, states, dim):
    text = str(spec).strip()
    if states is not None:
        chosen = _indices("good", text, text, states)
        return tuple(i in chosen for i in range(states))
    head, _, rest = text.partition(":")
    if head == "halfspace":
        a_text, _, c_text = rest.rpartition(":")
        a = _floats("good", a_text, "halfspace:A1,..,Ad:C", text)
        c = check_float(f"good {text!r} offset", c_text)
        if (dim is not None and len(a) != dim) or not any(a):
            raise ConfigError(f"good {text!r} needs a non-zero normal of {dim} coordinates")
        return Region("halfspace", a, c)
    if head == "ball":
        r_text, _, c_text = rest.partition(":")
        r = check_float(f"good {text!r} radius", r_text, 0.0, open_min=True)
        return Region("ball", _centre("good", c_text, "ball:R:C1,..,Cd", text, dim), r)
    raise ConfigError(f"good {text!r} must be halfspace:A1,..,Ad:C or ball:R:C1,..,Cd")
