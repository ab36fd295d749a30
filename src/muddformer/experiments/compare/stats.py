"""The statistics of `mudd compare`, without SciPy: Welch's t-test, Cohen's d, the compute multiplier."""

from __future__ import annotations

import math
import statistics


def _beta_continued_fraction(a: float, b: float, x: float, eps: float = 1e-15, max_terms: int = 10_000) -> float:
    """The continued fraction 1/(1+ d1/(1+ d2/(1+ ...))) of the incomplete beta function, by Lentz's method.

    d(2m+1) = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)),  d(2m) = m(b-m)x / ((a+2m-1)(a+2m)).
    """
    tiny = 1e-300
    f, c, d = tiny, tiny, 0.0
    for j in range(1, max_terms + 1):
        n = j - 1  # index of the partial numerator d_n; the first numerator is 1
        if n == 0:
            num = 1.0
        elif n % 2:
            m = (n - 1) // 2
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            m = n // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return f


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # The fraction converges quickly below the mean (a+1)/(a+b+2); above it use I_x(a,b) = 1 - I_(1-x)(b,a).
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / a * _beta_continued_fraction(a, b, x)


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_(df/(df+t^2))(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return min(1.0, regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t)))


def welch_t_test(a: list[float], b: list[float]) -> dict:
    """Welch's unequal-variance t-test of mean(a) - mean(b): t, Welch-Satterthwaite df, two-sided p.

    With fewer than 2 values in either sample the variances are unknown, and a non-finite value has none:
    t, df and p are None.
    With zero variance in both samples t is +-inf and p is 0 when the means differ, t = 0 and p = 1
    when they are equal (df is None in both cases).
    """
    if len(a) < 2 or len(b) < 2 or not all(math.isfinite(x) for x in (*a, *b)):
        return {"t": None, "df": None, "p": None}
    diff = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return {"t": math.copysign(math.inf, diff) if diff else 0.0, "df": None, "p": 0.0 if diff else 1.0}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return {"t": t, "df": df, "p": student_t_two_sided_p(t, df)}


def cohen_d(a: list[float], b: list[float]) -> float | None:
    """Effect size of mean(a) - mean(b) in units of the pooled standard deviation (None below 2 values each,
    or with no spread at all)."""
    if len(a) < 2 or len(b) < 2 or not all(math.isfinite(x) for x in (*a, *b)):
        return None
    pooled = ((len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)) / (len(a) + len(b) - 2)
    return (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(pooled) if pooled > 0 else None


def difference_test(a: list[float], b: list[float]) -> dict:
    """Welch's test and Cohen's d of mean(a) - mean(b): {t, df, p, d}."""
    return {**welch_t_test(a, b), "d": cohen_d(a, b)}


def compute_multiplier(
    base_steps: list[float], base_losses: list[float], method_final_loss: float, method_steps: float
) -> dict:
    """How many times more steps the baseline needs to reach a method's final loss.

    The baseline's curve is made monotone (running minimum) and interpolated linearly in step
    between its evaluations; s* is the first step where it reaches `method_final_loss`, and the
    multiplier is s* / method_steps. Returns a dict with `multiplier`, `step` (s*),
    `lower_bound` and `upper_bound`:
    - the baseline never gets there: multiplier None, lower_bound = last baseline step / method_steps;
    - the method's loss is above the baseline's first evaluation (reached before the curve starts):
      multiplier None, upper_bound = first baseline step / method_steps;
    - a method's loss that is not finite: all None.
    """
    result = {"multiplier": None, "step": None, "lower_bound": None, "upper_bound": None}
    if not base_steps or len(base_steps) != len(base_losses) or method_steps <= 0:
        raise ValueError("compute_multiplier needs a non-empty baseline curve and method_steps > 0")
    if not all(math.isfinite(loss) for loss in base_losses):  # the running minimum would step over a NaN
        raise ValueError(f"compute_multiplier needs a finite baseline curve, not {base_losses}")
    if not math.isfinite(method_final_loss):  # no step reaches a NaN: neither a value nor a bound
        return result
    best = list(base_losses)
    for i in range(1, len(best)):
        best[i] = min(best[i], best[i - 1])
    if method_final_loss > best[0]:
        result["upper_bound"] = base_steps[0] / method_steps
        return result
    for i, loss in enumerate(best):
        if loss <= method_final_loss:
            if i == 0:
                step = float(base_steps[0])
            else:  # best[i-1] > method_final_loss >= best[i], so the segment falls strictly
                frac = (best[i - 1] - method_final_loss) / (best[i - 1] - best[i])
                step = base_steps[i - 1] + frac * (base_steps[i] - base_steps[i - 1])
            result.update(multiplier=step / method_steps, step=step)
            return result
    result["lower_bound"] = base_steps[-1] / method_steps
    return result
