"""Differential privacy on the device: the Gaussian mechanism and its accountants.

The device answers a cloud probe (K centroids) with K coverage counts. Each local sample votes
once, for one centroid, so adding or removing one sample changes one count by one: the L2
sensitivity of the count vector is 1. The device adds N(0, sigma^2) noise to every count, and
it, not the cloud, keeps the books: :class:`PrivacyLedger` is one JSON file per device holding the
total budget and every release; :meth:`PrivacyLedger.release` is the only way to spend, and it
refuses (:class:`~device_sdk.errors.PrivacyBudgetExceeded`) any release that would take the
composed epsilon past the budget.

Two accountants, both for compositions of Gaussian mechanisms (a release ``i`` is
``(sigma_i, sensitivity_i)`` with noise multiplier ``mu_i = sensitivity_i / sigma_i``):

``"gaussian"`` (default, exact)
    A composition of Gaussian mechanisms is exactly one Gaussian mechanism with
    ``mu = sqrt(sum mu_i^2)`` (Dong, Roth & Su, Gaussian DP). Its privacy profile is the analytic
    Gaussian one (Balle & Wang 2018)::

        delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2)

    and epsilon for a target delta is found by bisection. This is tight: no (eps, delta) pair
    smaller than the one returned holds for the composed mechanism.

``"rdp"``
    Renyi DP of the Gaussian, ``alpha * sum(mu_i^2) / 2``, on dp-accounting's default grid of
    orders, converted to (eps, delta) with the conversion of Canonne, Kamath & Steinke 2020
    (Prop. 12) / Asoodeh et al. 2020, the one dp-accounting's ``RdpAccountant`` uses. Looser than
    ``"gaussian"`` (about 10% more epsilon for one release at delta 1e-5); offered because the
    paper accounts with RDP.

Only numpy and the standard library are used here; dp-accounting is used by the tests alone, as
an independent check.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence, Tuple, Union

import numpy as np

from device_sdk.errors import (
    UsageError,
)
from device_sdk.registry import Registry

__all__ = [
    "ACCOUNTANT_REGISTRY",
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "DEFAULT_BUDGET_DELTA",
    "DEFAULT_BUDGET_EPSILON",
    "DEFAULT_RDP_ORDERS",
    "calibrate_sigma",
    "composed_mu",
    "epsilon",
    "gaussian_delta",
    "gaussian_noise",
    "rdp_epsilon",
]

DEFAULT_ACCOUNTANT = "gaussian"
DEFAULT_BUDGET_EPSILON = 3.0
DEFAULT_BUDGET_DELTA = 1e-5

# The same orders as dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS (0.6.0).
DEFAULT_RDP_ORDERS: Tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(x) for x in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)

ReleaseLike = Union[Tuple[float, float], Sequence[float]]

_SQRT2 = math.sqrt(2.0)
_SQRT_PI = math.sqrt(math.pi)


# --------------------------------------------------------------------------------------------
# Special functions (no scipy on the device)
# --------------------------------------------------------------------------------------------


def _erfcx(x: float) -> float:
    """Scaled complementary error function ``exp(x^2) * erfc(x)``, without overflow for x >= 0.

    For x < 25 ``math.erfc`` is accurate to a few ulps in relative terms (it does not underflow
    before x ~ 26.5) and ``exp(x^2)`` is finite; above, the asymptotic series
    ``1/(x sqrt(pi)) * sum_k (-1)^k (2k-1)!! / (2x^2)^k`` is summed while its terms shrink (at
    x >= 25 the first neglected term is below 1e-20 relative).
    """
    if x < 25.0:
        return math.exp(x * x) * math.erfc(x)
    inv = 1.0 / (2.0 * x * x)
    term = 1.0
    total = 1.0
    k = 1
    while True:
        nxt = -term * (2 * k - 1) * inv
        if abs(nxt) >= abs(term) or abs(nxt) < 1e-17 * abs(total):
            break
        total += nxt
        term = nxt
        k += 1
    return total / (x * _SQRT_PI)


def _phi_cdf(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / _SQRT2)


# --------------------------------------------------------------------------------------------
# Accountants
# --------------------------------------------------------------------------------------------

# An accountant maps (sum of mu_i^2, delta) to the epsilon of the composition; the functions are
# registered below, after the maths they use.
ACCOUNTANT_REGISTRY: Registry[Callable[[float, float], float]] = Registry("privacy accountant", ordered=True)


def _check_accountant(accountant: str) -> str:
    ACCOUNTANT_REGISTRY.get(accountant)
    return accountant


def _check_delta(delta: float) -> float:
    try:
        delta = float(delta)
    except (TypeError, ValueError):
        raise UsageError(f"delta must be a number, got {delta!r}") from None
    if not (0.0 < delta < 1.0):
        raise UsageError(f"delta must be in (0, 1), got {delta!r}")
    return delta


def _check_positive(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise UsageError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _mu_squared(releases: Iterable[ReleaseLike]) -> float:
    total = 0.0
    for rel in releases:
        try:
            sigma, sensitivity = rel
        except (TypeError, ValueError):
            raise UsageError(f"a release is a (sigma, sensitivity) pair, got {rel!r}") from None
        sigma = _check_positive("sigma", sigma)
        sensitivity = _check_positive("sensitivity", sensitivity)
        ratio = sensitivity / sigma
        total += ratio * ratio  # inf for an absurd ratio (** 2 would raise OverflowError instead)
    return total


def composed_mu(releases: Iterable[ReleaseLike]) -> float:
    """Noise multiplier ``mu = sqrt(sum (sensitivity_i / sigma_i)^2)`` of the composition."""
    return math.sqrt(_mu_squared(releases))


def gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of a ``mu``-Gaussian mechanism (Balle & Wang 2018, Theorem 8).

    ``Phi(a) - exp(eps) Phi(b)`` with ``a = mu/2 - eps/mu`` and ``b = -mu/2 - eps/mu``. Since
    ``exp(eps) exp(-b^2/2) = exp(-a^2/2)`` exactly, both terms are evaluated as
    ``0.5 exp(-a^2/2) erfcx(.)``, which neither overflows (``exp(eps)`` for large eps) nor
    underflows to 0 - 0 (tails of Phi).
    """
    if mu <= 0.0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    if eps == math.inf:
        return 0.0
    a = mu / 2.0 - eps / mu
    b = -mu / 2.0 - eps / mu
    scale = 0.5 * math.exp(-0.5 * a * a)
    if a >= 0.0:
        # Phi(a) >= 1/2: no cancellation problem, evaluate it directly.
        first = _phi_cdf(a)
        second = scale * _erfcx(-b / _SQRT2)
        return max(0.0, first - second)
    return max(0.0, scale * (_erfcx(-a / _SQRT2) - _erfcx(-b / _SQRT2)))


def _gaussian_epsilon(mu: float, delta: float) -> float:
    if mu == 0.0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, max(1.0, mu * mu)
    while gaussian_delta(hi, mu) > delta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e12:  # pragma: no cover - only for absurd mu
            return math.inf
    # delta(eps) is strictly decreasing: bisection to full float precision.
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if gaussian_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi  # the smallest representable eps found with delta(eps) <= target


def rdp_epsilon(
    rdp: Sequence[float], delta: float, orders: Sequence[float] = DEFAULT_RDP_ORDERS
) -> Tuple[float, float]:
    """(eps, optimal order) from Renyi DP values at ``orders``.

    Conversion of Canonne, Kamath & Steinke 2020 (Prop. 12), also Asoodeh et al. 2020 (Eq. 20):
    ``eps = r + log1p(-1/a) - log(delta * a) / (a - 1)``, minimised over the orders; an order
    whose divergence is so small that ``delta^2 + expm1(-r) > 0`` gives eps = 0 (KL bound);
    orders at or below 1.01 are not used (the bound is unstable there).
    """
    delta = _check_delta(delta)
    if len(orders) != len(rdp):
        raise UsageError("rdp and orders must have the same length")
    best_eps, best_order = math.inf, float(orders[0])
    for a, r in zip(orders, rdp):
        a = float(a)
        r = float(r)
        if a < 1.0:
            raise UsageError(f"Renyi order must be at least 1, got {a}")
        if r < 0.0:
            eps = 0.0
        elif math.isinf(r):
            eps = math.inf
        elif delta * delta + math.expm1(-r) > 0.0:
            eps = 0.0
        elif a > 1.01:
            eps = r + math.log1p(-1.0 / a) - math.log(delta * a) / (a - 1.0)
        else:
            eps = math.inf
        if eps < best_eps:
            best_eps, best_order = eps, a
    return max(0.0, best_eps), best_order


@ACCOUNTANT_REGISTRY.register("gaussian")
def _gaussian_accountant(mu2: float, delta: float) -> float:
    return _gaussian_epsilon(math.sqrt(mu2), delta)


@ACCOUNTANT_REGISTRY.register("rdp")
def _rdp_accountant(mu2: float, delta: float) -> float:
    rdp = [a * mu2 / 2.0 for a in DEFAULT_RDP_ORDERS]
    return rdp_epsilon(rdp, delta)[0]


ACCOUNTANTS: Tuple[str, ...] = tuple(ACCOUNTANT_REGISTRY.names())  # ("gaussian", "rdp")


def _epsilon_from_mu2(mu2: float, delta: float, accountant: str) -> float:
    return ACCOUNTANT_REGISTRY.get(accountant)(mu2, delta)


def epsilon(releases: Iterable[ReleaseLike], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon at ``delta`` of the composition of Gaussian releases ``(sigma, sensitivity)``.

    No releases cost 0. ``accountant`` is ``"gaussian"`` (exact) or ``"rdp"``.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    return _epsilon_from_mu2(_mu_squared(releases), delta, accountant)


def calibrate_sigma(
    epsilon: float, delta: float, sensitivity: float = 1.0, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """The smallest sigma for which ONE release of ``sensitivity`` is (epsilon, delta)-DP.

    Epsilon grows with ``mu = sensitivity / sigma``; the largest mu meeting the target is found by
    bisection and the returned sigma is checked (and nudged up by ulps if rounding demands) so that
    ``epsilon([(sigma, sensitivity)], delta, accountant) <= epsilon`` holds exactly.
    """
    _check_accountant(accountant)
    target = _check_positive("epsilon", epsilon)
    delta = _check_delta(delta)
    sensitivity = _check_positive("sensitivity", sensitivity)

    def eps_of_mu(mu: float) -> float:
        return _epsilon_from_mu2(mu * mu, delta, accountant)

    lo, hi = 0.0, 1.0
    while eps_of_mu(hi) <= target:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:  # pragma: no cover - absurd epsilon
            raise UsageError(f"epsilon {target} is too large to calibrate a noise scale")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if eps_of_mu(mid) <= target:
            lo = mid
        else:
            hi = mid
    if lo == 0.0:  # pragma: no cover - target below what any finite sigma meets at float precision
        raise UsageError(f"epsilon {target} at delta {delta} is too small to calibrate")
    sigma = sensitivity / lo
    for _ in range(64):
        if _epsilon_from_mu2((sensitivity / sigma) ** 2, delta, accountant) <= target:
            break
        sigma = math.nextafter(sigma, math.inf)
    return sigma


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def gaussian_noise(n: int, sigma: float, rng: Union[np.random.Generator, int, None] = None) -> np.ndarray:
    """``n`` draws of N(0, sigma^2) as float64.

    By default a fresh ``numpy.random.default_rng()`` seeded from OS entropy is used: that is the
    only acceptable choice on a device. Passing a Generator or an integer seed makes the noise
    reproducible and is meant for tests only: noise the cloud can predict protects nothing.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise UsageError(f"n must be a non-negative integer, got {n!r}")
    sigma = _check_positive("sigma", sigma)
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return rng.normal(0.0, sigma, size=int(n)).astype(np.float64, copy=False)
