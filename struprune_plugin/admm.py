"""ADMM block solver for one decoder layer's MLP chain, and least-squares refits (method.md section 4).

Row convention: tokens are rows. X (n x d) is the MLP input, W_gate/W_up (I x d), W_down (d x I),
z = X W_up^T, s = X W_gate^T, p = f(s) * z, Y = p W_down^T (the dense output, the target), where f is
the layer's own activation (SiLU for Llama/Mistral/Qwen, GELU or GELU-tanh elsewhere, ReLU).

Objective (SparseLLM's auxiliary variables decouple the chain):
    a||z - X W_up^T||^2 + a||s - X W_gate^T||^2 + b||Y - p W_down^T||^2 + g||p - f(s) * z||^2
with the weights split as W = Q, Q constrained to keep k channels (gate/up rows and the down column
chosen together), scaled dual L and penalty rho:
    W <- ridge least squares towards the targets and Q - L     (closed form, Cholesky)
    Q <- keep the k best channels of W + L                     (projection)
    L <- L + W - Q                                             (dual update)
    p, z <- closed forms, s <- a few gradient steps            (auxiliary variables)
and finally the mask is fixed and the kept weights are refitted by least squares.

All solves run in float64 with a ridge added afresh each time (never accumulated across iterations,
a known SparseLLM bug): `damping` x the Gram's mean diagonal on every channel (`ridge_scale="mean"`),
or `damping` x each channel's own second moment (`"channel"`, scale-free; see `damp_diagonal`).
Data terms are divided by the token count so that a, b, g and rho mean the same for any
calibration size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import distributed
from .distributed import all_sum


@dataclass(frozen=True)
class Activation:
    """An MLP activation as the solver needs it: the function, its value and slope together (the
    s-step's gradient), and a bound on f'^2 (the step size comes from a curvature bound)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    value_and_slope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    slope_sq_bound: float


def _silu_value_and_slope(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sig = torch.sigmoid(s)
    return torch.mul(s, sig), (1 - sig).mul_(s).add_(1).mul_(sig)  # SiLU'(s) = sig (1 + s (1 - sig))


def _gelu_value_and_slope(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cdf = torch.erf(s * (1 / math.sqrt(2))).add_(1).mul_(0.5)
    pdf = torch.exp(-0.5 * s * s).mul_(1 / math.sqrt(2 * math.pi))
    return s * cdf, cdf.add_(s * pdf)  # GELU'(s) = Phi(s) + s phi(s)


def _gelu_tanh_value_and_slope(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, k = math.sqrt(2 / math.pi), 0.044715
    t = torch.tanh(c * (s + k * s.pow(3)))
    value = 0.5 * s * (1 + t)
    slope = 0.5 * (1 + t) + 0.5 * s * (1 - t * t) * c * (1 + 3 * k * s * s)
    return value, slope


def _relu_value_and_slope(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.relu(s), (s > 0).to(s.dtype)


#: The activations the solver is exact for, by name: |SiLU'| <= 1.1, |GELU'| <= 1.129 (at s = 1.414).
ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation("silu", F.silu, _silu_value_and_slope, 1.21),
    "gelu": Activation("gelu", F.gelu, _gelu_value_and_slope, 1.28),
    "gelu_tanh": Activation(
        "gelu_tanh", lambda s: F.gelu(s, approximate="tanh"), _gelu_tanh_value_and_slope, 1.28
    ),
    "relu": Activation("relu", torch.relu, _relu_value_and_slope, 1.0),
}


@dataclass
class ADMMConfig:
    iterations: int = 4
    alpha: float = 1.0  # a: fit of the gate/up outputs
    beta: float = 1.0  # b: fit of the block output
    gamma: float = 1.0  # g: coupling p = f(s) * z
    rho: float = 0.3  # penalty (inputs are preconditioned to unit second moment, so scale-free)
    rho_growth: float = 1.3
    rho_max: float = 10.0
    damping: float = 0.01
    ridge_scale: str = "mean"  # a key of RIDGE_SCALES: what `damping` multiplies
    use_aux: bool = True  # SparseLLM auxiliary variables; False: fixed dense targets (Gram-only)
    s_steps: int = 5  # gradient steps for s (no closed form through the activation)
    activation: str = "silu"  # the layer's own MLP activation, a key of ACTIVATIONS
    refit: bool = True
    intercept: bool = False  # the final refit also fits a bias on down_proj (mean compensation, exact LS)
    token_dtype: torch.dtype = torch.float32  # per-token work; the small solves always run in float64
    # The ADMM state (one weight-sized matrix per MLP linear, `update_in_place`): float32 halves the
    # solver's largest buffers (1.1 GB at 7B widths in float64); every solve still runs in float64.
    state_dtype: torch.dtype = torch.float32
    max_tokens: int = 8192  # calibration tokens the solver uses (a seeded subsample beyond that)
    track_history: bool = False  # record the projected loss after every iteration (costs a forward)


def cholesky_in_place(g: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of a symmetric positive definite `g`, written over `g`.

    `torch.linalg.cholesky(g, out=g)` still copies a row-major input to LAPACK's column-major
    order (a GB at 7B MLP widths). A symmetric matrix read column-major is itself, so factorising
    its transposed view as U^T U leaves L = U^T in g's own row-major memory, with no copy."""
    torch.linalg.cholesky(g.mT, upper=True, out=g.mT)
    return g


def chol_solve_rows(rhs: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """rhs @ (L L^T)^-1 for a lower Cholesky factor L, by two triangular solves: unlike
    `torch.cholesky_solve`, which copies the factor (a GB at 7B MLP widths) on every call."""
    half = torch.linalg.solve_triangular(chol, rhs.double().T, upper=False)
    return torch.linalg.solve_triangular(chol.mT, half, upper=True).T


#: What the ridge `damping` multiplies, per channel:
#: - "mean": the Gram's mean diagonal, the same for every channel (classic ridge on raw inputs). A few
#:   massive-activation channels set the mean, so in some layers it is hundreds of times the typical
#:   channel's second moment and shrinks ordinary channels' weights far more than `damping` suggests
#:   (integration/gram_spread.py: SmolLM2 layer 11's down_proj input, 539x).
#: - "channel": the channel's own second moment (Marquardt scaling; the same as a uniform ridge on
#:   inputs standardised to unit second moment), so every weight is shrunk by about 1 / (1 + damping)
#:   whatever its input's scale. Channels with no signal get a floor of 1e-6 x the mean.
#:   Measured on SmolLM2 at 30 % (integration/results/generalisation.md, the ridge rows): no better than "mean" at the same damping, so
#:   the spread of the mean-scaled ridge is not what costs quality; "mean" stays the default.
RIDGE_SCALES = ("mean", "channel")


def damp_diagonal(g: torch.Tensor, damping: float, scale: str = "mean") -> torch.Tensor:
    """Add the ridge to a Gram's diagonal in place (no identity matrix is built); returns `g`."""
    diag = g.diagonal()
    mean = float(diag.mean().clamp(min=1e-12))
    if scale == "mean":
        diag.add_(damping * mean)
    elif scale == "channel":
        diag.add_(diag.clamp(min=1e-6 * mean).mul_(damping))
    else:
        raise ValueError(f"ridge scale must be one of {RIDGE_SCALES}; got {scale!r}")
    return g


def ridge_solve(
    rhs: torch.Tensor,
    gram: torch.Tensor,
    damping: float,
    overwrite: bool = False,
    scale: str = "mean",
) -> torch.Tensor:
    """rhs @ (gram + ridge)^-1 by Cholesky, in float64, the ridge from `damp_diagonal`. With
    `overwrite` a float64 `gram` becomes its own factor (the caller's temporary: no second
    width-squared copy)."""
    g = gram if overwrite and gram.dtype == torch.float64 else gram.double().clone()
    damp_diagonal(g, damping, scale)
    chol = cholesky_in_place(g)
    return chol_solve_rows(rhs, chol)


def weight_update(
    cross: torch.Tensor, gram: torch.Tensor, anchor: torch.Tensor, weight: float, rho: float
) -> torch.Tensor:
    """argmin_W  weight * ||T - A W^T||^2 / n + rho/2 ||W - anchor||^2,
    given cross = T^T A / n and gram = A^T A / n:  W = (weight*cross + rho/2 anchor)(weight*gram + rho/2 I)^-1.
    (The solver itself runs the same step in place, `update_in_place`.)"""
    g = gram.double().mul(weight)
    g.diagonal().add_(0.5 * rho)
    chol = cholesky_in_place(g)
    rhs = anchor.double().mul(0.5 * rho).add_(cross.double(), alpha=weight)
    return torch.cholesky_solve(rhs.T, chol).T


def p_update(
    y: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """argmin_p  b||Y - p W_down^T||^2 + g||p - act||^2  =  R (b W^T W + g I)^-1,  R = b Y W + g act.

    W is d x I with d < I in every LLM MLP, so the I x I inverse is never formed (at 7B widths
    it is a GB in float64 and an I^3 factorisation): by Woodbury,
    (g I + b W^T W)^-1 = (I - W^T (g/b I_d + W W^T)^-1 W) / g, a d x d system, and
    p = (R - ((R W^T) K^-1) W) / g with K = g/b I_d + W W^T (float64 Cholesky; the token-sized
    products run in the tokens' dtype)."""
    w = w_down.double()
    k = w @ w.T
    k.diagonal().add_(gamma / beta)
    chol = cholesky_in_place(k)
    w_t = w.to(y.dtype)
    rhs = (y @ w_t).mul_(beta).add_(act.to(y.dtype), alpha=gamma)  # token-sized, tokens' dtype
    coeff = torch.cholesky_solve((rhs @ w_t.T).double().T, chol).T.to(y.dtype)
    return rhs.sub_(coeff @ w_t).div_(gamma)


def update_in_place(
    v: torch.Tensor,
    mask: torch.Tensor,
    rows: bool,
    first: bool,
    cross: torch.Tensor | Callable[[int, int], torch.Tensor],
    gram: torch.Tensor,
    weight: float,
    rho: float,
    overwrite_gram: bool = False,
    chunk: int = 512,
) -> torch.Tensor:
    """One ADMM weight step on the lean state (see `solve_gated_mlp`), in place on V = W + L:
    W = weight_update(cross, gram, Q - L) with Q - L = V (2m - 1) (just V m before the first
    step), then V <- W + L with L = V (1 - m). Row blocks of V are solved in turn, so no
    weight-sized temporary exists; with `overwrite_gram` the Gram becomes its own Cholesky factor
    (MLP-width squared in float64 is a GB at 7B widths). `mask` (float64, 1 = kept) runs along V's
    rows (`rows`: gate/up, channels are rows) or its columns (down). `cross` may be a function of
    (start, stop) giving those rows of the cross term, so it too is formed block by block."""
    g = gram if overwrite_gram and gram.dtype == torch.float64 else gram.double().clone()
    g.mul_(weight).diagonal().add_(0.5 * rho)
    chol = cholesky_in_place(g)
    for start in range(0, v.shape[0], chunk):
        block = v[start : start + chunk]
        m = mask[start : start + chunk, None] if rows else mask[None, :]
        signed = m if first else 2 * m - 1
        stop = start + block.shape[0]
        rows_of_cross = cross(start, stop) if callable(cross) else cross[start:stop].double()
        rhs = (block * signed).mul_(0.5 * rho).add_(rows_of_cross, alpha=weight)
        w = chol_solve_rows(rhs, chol)
        if not first:
            w.addcmul_(block, 1 - m)
        block.copy_(w)
    return v


def z_update(
    m: torch.Tensor, sigma: torch.Tensor, p: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Element-wise argmin_z  a (z - m)^2 + g (p - sigma z)^2  =  (a m + g sigma p) / (a + g sigma^2)."""
    return (alpha * m + gamma * sigma * p) / (alpha + gamma * sigma.pow(2))


def s_update(
    s: torch.Tensor,
    target: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    alpha: float,
    gamma: float,
    steps: int,
    activation: Activation = ACTIVATIONS["silu"],
) -> torch.Tensor:
    """A few gradient steps on a (s - target)^2 + g (p - f(s) z)^2, step size from a curvature bound.

    Written with in-place updates: these tensors are tokens x width, the largest in the solver.
    """
    s = s.clone()
    bound = activation.slope_sq_bound
    inv_curvature = (z * z).mul_(2 * gamma * bound).add_(2 * alpha).reciprocal_()
    for _ in range(steps):
        value, slope = activation.value_and_slope(s)
        residual = value.mul_(z).neg_().add_(p)  # p - f(s) z
        grad = residual.mul_(slope).mul_(z).mul_(-2 * gamma)
        grad.add_(s - target, alpha=2 * alpha)
        s.sub_(grad.mul_(inv_curvature))
    return s


def _in_row_blocks(fn, *tensors: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Apply a row-wise element-wise function block by block: the z- and s-updates chain many
    element-wise passes over tokens x width tensors, which run several times faster on blocks that
    stay in cache."""
    return torch.cat([fn(*parts) for parts in zip(*(t.split(rows) for t in tensors))])


def scaled_gram(a: torch.Tensor, n: int, chunk: int = 1024) -> torch.Tensor:
    """A^T A / n in float64, summed over ranks: products in A's dtype, one block of rows at a
    time, so no second width-squared matrix ever exists beside the result."""
    out = torch.empty(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], chunk):
        out[start : start + chunk] = a[:, start : start + chunk].T @ a
    return all_sum(out).div_(n)


def _mean_square(t: torch.Tensor, n: int) -> torch.Tensor:
    """Per-column mean of squares over every rank's rows (float64)."""
    if not distributed.active():
        return t.pow(2).mean(0).double()
    return all_sum(t.pow(2).sum(0).double()) / n


def channel_scores(w_down: torch.Tensor, gram_p_diag: torch.Tensor) -> torch.Tensor:
    """Output error of removing channel j alone: ||W_down[:, j]||^2 * E[p_j^2] (OBS-diagonal)."""
    return w_down.double().pow(2).sum(0) * gram_p_diag.double()


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)[:keep].sort().values


@dataclass
class MLPSolution:
    keep: list[int]
    w_gate: torch.Tensor  # kept rows
    w_up: torch.Tensor
    w_down: torch.Tensor  # kept columns
    down_bias_shift: torch.Tensor | None = None  # with `intercept`: add to down_proj's bias
    history: list[float] = field(default_factory=list)  # losses: [projected start, iterations,] final


def _gated(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str = "silu"
) -> torch.Tensor:
    return ACTIVATIONS[activation].fn(x @ w_gate.T) * (x @ w_up.T)


def block_loss(
    x, y, w_gate, w_up, w_down, bias=None, activation: str = "silu", n: int | None = None
) -> float:
    """Mean squared output error of a (pruned) gated MLP on the calibration tokens (`n`: the token
    count over every rank, when the tokens are shared by torch.distributed ranks)."""
    t = x.dtype
    out = _gated(x, w_gate.to(t), w_up.to(t), activation) @ w_down.to(t).T
    if bias is not None:
        out = out + bias.to(t)
    total = distributed.all_sum_scalar(float((y - out).double().pow(2).sum()))
    return total / (n or x.shape[0])


def refit_down(
    x,
    y,
    w_gate,
    w_up,
    damping: float,
    intercept: bool = False,
    activation: str = "silu",
    n: int | None = None,
    ridge_scale: str = "mean",
):
    """Least-squares W_down for given (kept) gate/up rows: argmin ||Y - p W^T (- c)||^2.

    Returns (W, c); with `intercept` the bias shift c is fitted too (centred normal equations),
    else c is None. `n` is the token count over every distributed rank (default: x's rows)."""
    p = _gated(x, w_gate.to(x.dtype), w_up.to(x.dtype), activation)
    if not intercept:
        rhs = all_sum((y.T @ p).double())
        return ridge_solve(rhs, scaled_gram(p, 1), damping, overwrite=True, scale=ridge_scale), None
    n = n or p.shape[0]
    mp, my = all_sum(p.double().sum(0)) / n, all_sum(y.double().sum(0)) / n
    gram = all_sum((p.T @ p).double()) / n - torch.outer(mp, mp)
    cross = all_sum((y.T @ p).double()) / n - torch.outer(my, mp)
    w = ridge_solve(cross, gram, damping, scale=ridge_scale)
    return w, my - w @ mp


def solve_gated_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    keep: int,
    cfg: ADMMConfig | None = None,
) -> MLPSolution:
    """Choose `keep` MLP channels and updated weights for one gated MLP (activation `cfg.activation`).

    `x` holds the calibration inputs of the MLP (tokens x d). The ADMM runs in a preconditioned
    space where every input feature (of X and of the dense p) has unit second moment, so the
    Euclidean projection onto "keep k channels" ranks channels by activation-weighted norms (the
    Wanda/OBS insight) and rho is scale-free. With `keep` equal to the width the layer comes back
    unchanged.
    """
    cfg = cfg or ADMMConfig()
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(
            f"the MLP solver handles the activations {sorted(ACTIVATIONS)}, not {cfg.activation!r}"
        )
    act = ACTIVATIONS[cfg.activation]
    t = cfg.token_dtype
    # Under torch.distributed each rank holds a consecutive block of the one-process rows: the
    # seeded subsample is drawn over all rows and every rank keeps the picks that fall in its block.
    offset, total = distributed.row_offset(x.shape[0])
    if total > cfg.max_tokens:  # the per-token work dominates; least squares needs far fewer rows
        pick = torch.randperm(total, generator=torch.Generator().manual_seed(0))[: cfg.max_tokens]
        if distributed.active():
            pick = pick[(pick >= offset) & (pick < offset + x.shape[0])] - offset
        x = x[pick.to(x.device)]
    x = x.to(t)
    n = min(total, cfg.max_tokens)  # tokens over every rank: every sum below is all-reduced
    width = w_down.shape[1]
    s = x @ w_gate.T.to(t)
    z = x @ w_up.T.to(t)
    p = act.fn(s) * z
    y = p @ w_down.T.to(t)  # the dense output is the target throughout
    if keep >= width:
        return MLPSolution(list(range(width)), w_gate, w_up, w_down, history=[0.0])
    s_target, z_target = (None, None) if cfg.use_aux else (s.clone(), z.clone())
    # Preconditioners, fixed for the whole solve (float32 means of squares: no token-sized float64 copy).
    dx = _mean_square(x, n).sqrt().clamp(min=1e-8)
    dp = _mean_square(p, n).sqrt().clamp(min=1e-8)
    xs = x / dx.to(t)
    gram_x = scaled_gram(xs, n)

    def cross(target, inputs):
        return all_sum((target.T @ inputs).double()) / n

    def cross_rows(target, inputs):  # rows start:stop of cross(target, inputs), on demand
        return lambda start, stop: all_sum((target[:, start:stop].T @ inputs).double()).div_(n)

    # The ADMM state is kept lean: V = W + L (weights plus scaled duals in the preconditioned space,
    # stored in `cfg.state_dtype`) and the mask m of kept channels. After every projection Q = V m
    # and L = V (1 - m), so the next anchor Q - L is V (2m - 1) and W + L is W + V (1 - m): one
    # matrix per weight instead of W, Q and L, which at 7B widths saves gigabytes.
    sd = cfg.state_dtype
    vg, vu, vd = (
        w.to(sd, copy=True).mul_(scale.to(sd)) for w, scale in ((w_gate, dx), (w_up, dx), (w_down, dp))
    )
    first = True  # before the first update L = 0, so the anchor is Q itself

    def project() -> torch.Tensor:
        score = cfg.alpha * (vg.pow(2).sum(1) + vu.pow(2).sum(1)) + cfg.beta * vd.pow(2).sum(0)
        idx = top_channels(score, keep)
        mask = torch.zeros(width, dtype=torch.float64, device=x.device)
        mask[idx] = 1.0
        return idx, mask

    def shaped(m: torch.Tensor, rows: bool) -> torch.Tensor:
        return m[:, None] if rows else m[None, :]

    def kept(v: torch.Tensor, rows: bool, dtype=torch.float64) -> torch.Tensor:  # Q
        return v.to(dtype) * shaped(mask, rows).to(dtype)

    def update(v, rows, target_cross, gram, weight, rho, overwrite_gram=False):
        return update_in_place(v, mask, rows, first, target_cross, gram, weight, rho * weight, overwrite_gram)

    def loss():
        return block_loss(
            x, y, kept(vg, True) / dx, kept(vu, True) / dx, kept(vd, False) / dp, activation=act.name, n=n
        )

    idx, mask = project()
    history = [loss()] if cfg.track_history else []
    rho = cfg.rho
    for _ in range(cfg.iterations):
        ps = p / dp.to(t)
        gram_p = scaled_gram(ps, n)
        vu = update(vu, True, cross_rows(z, xs), gram_x, cfg.alpha, rho)
        vg = update(vg, True, cross_rows(s, xs), gram_x, cfg.alpha, rho)
        vd = update(vd, False, cross_rows(y, ps), gram_p, cfg.beta, rho, overwrite_gram=True)
        del gram_p, ps
        idx, mask = project()
        first = False
        if cfg.use_aux:
            sigma = act.fn(s)
            p = p_update(y, kept(vd, False).div_(dp), sigma * z, cfg.beta, cfg.gamma)
            z = _in_row_blocks(
                lambda *rows: z_update(*rows, cfg.alpha, cfg.gamma), xs @ kept(vu, True, t).T, sigma, p
            )
            s = _in_row_blocks(
                lambda *rows: s_update(*rows, cfg.alpha, cfg.gamma, cfg.s_steps, act),
                s,
                xs @ kept(vg, True, t).T,
                z,
                p,
            )
        else:
            s, z = s_target, z_target
            p = act.fn(s) * z
        if cfg.track_history:
            history.append(loss())
        rho = min(rho * cfg.rho_growth, cfg.rho_max)
    kg, ku = vg[idx] / dx, vu[idx] / dx
    vg = vu = None  # free the ADMM state (the closures above keep the names)
    if cfg.refit:
        vd = None  # the refit fits down_proj afresh: free the ADMM state first
    if cfg.refit:
        if cfg.use_aux:  # gate/up rows towards their auxiliary targets, then down against Y
            gram = all_sum((x.T @ x).double()) / n
            kg = ridge_solve(cross(s[:, idx], x), gram, cfg.damping, scale=cfg.ridge_scale)
            ku = ridge_solve(cross(z[:, idx], x), gram, cfg.damping, scale=cfg.ridge_scale)
        kd, shift = refit_down(x, y, kg, ku, cfg.damping, cfg.intercept, act.name, n, cfg.ridge_scale)
    else:
        kd, shift = vd[:, idx] / dp[idx], None
    history.append(block_loss(x, y, kg, ku, kd, shift, act.name, n))
    dtype = w_down.dtype
    return MLPSolution(
        idx.tolist(),
        kg.to(dtype),
        ku.to(dtype),
        kd.to(dtype),
        None if shift is None else shift.to(dtype),
        history,
    )


def refit_output_columns(
    w_out: torch.Tensor,
    gram_in: torch.Tensor,
    keep: list[int],
    damping: float,
    mean_in: torch.Tensor | None = None,
    ridge_scale: str = "mean",
):
    """Refit an output projection on its kept input columns so it best reproduces the dense output.

    With Y = A W^T the dense output, argmin_V ||Y - A_k V^T||^2 needs only the input Gram:
    V = W G[:, k] (G[k, k] + damping)^-1. Used for o_proj after head removal (and down_proj when
    the gate/up rows are kept as they are). Given `mean_in` (and `gram_in` = E[a a^T]) an intercept
    is fitted too: the same formula on the covariance, and the bias shift W mu - V mu_k, which
    generalises FLAP's bias compensation to the least-squares optimum. Returns (V, shift or None).
    """
    g = gram_in.double()
    k = torch.as_tensor(keep, device=g.device)
    if mean_in is not None:
        mu = mean_in.double().to(g.device)
        g = g - torch.outer(mu, mu)
    rhs = w_out.double() @ g[:, k]
    v = ridge_solve(rhs, g[k][:, k], damping, scale=ridge_scale)
    shift = None if mean_in is None else w_out.double() @ mu - v @ mu[k]
    return v.to(w_out.dtype), None if shift is None else shift.to(w_out.dtype)
