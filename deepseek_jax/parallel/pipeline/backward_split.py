"""One pipeline stage as four separately callable computations: F, B, I and W.

Zero-bubble schedules (ZB-H1, DualPipe) split a stage's backward into I, the input gradient that
the previous stage waits for, and W, the weight gradient, run later to fill a bubble. W must not
redo the input-gradient chain: it contracts, for every use of a weight, the saved input of that use
with the output gradient I kept (x^T dy for a matmul y = x W). This module derives that split for
any stage function with JAX's own machinery (the internals _jax_internals.py guards), with no change
to the model:

  1. `jax.linearize` the stage: its linear map  (t_params, t_x) -> (t_y, t_loss)  is a jaxpr whose
     constants are the forward's residuals.
  2. Partially evaluate that linear jaxpr with t_params known and t_x unknown. The known part P
     holds exactly the weight uses (`x_res @ t_W`, `normed_res * t_scale`, `take(t_E, tokens)`, ...:
     everything computable from t_params alone); it hands its results u to the unknown part R, the
     input chain, which adds them in. So  lin(t_p, t_x) = R(P(t_p), t_x).
  3. I = transpose of R: (ct_y, 1) -> (ct_x, ct_u), the input gradient plus the output gradient of
     every weight use. W = transpose of P: ct_u -> ct_params, contractions only (its FLOPs are
     the weight-gradient matmuls; tests check this with XLA's cost analysis). B = transpose of the
     whole linear map.

Partial evaluation recurses through scan (the stacked layers), cond (first/last-stage extras) and
pjit, so a scanned layer stack yields per-layer u stacked along the layer axis. A weight use that is
not separable (a `custom_vjp` such as the FP8 matmul takes t_W and t_x in one linear op; a region under
`jax.checkpoint`) makes t_W itself a u: the result stays exact, but that weight's gradient is then
computed in I. I also finishes every weight use whose part of P contracts nothing (a parameter passed
through a `cond`, a cast): W exists to defer the weight-gradient contractions, and keeping a
parameter-sized output gradient per micro-batch until W would cost more memory than the weight itself.

Residuals: F stashes only the residuals that depend on the incoming activation x; the rest (the
parameters themselves, their casts, attention masks, rope tables: functions of (params, ctx)) are
recomputed where they are needed rather than stored once per micro-batch in flight.

Contract of a stage function: `stage_fn(params, x, ctx) -> ((y, loss), stats)` with params a pytree
of float arrays (differentiated), x the incoming activation (differentiated), ctx anything else
(micro-batch data, stage index: not differentiated), y the outgoing activation (same shape and dtype
as x), loss a float32 scalar whose gradient is taken with cotangent 1, stats a pytree of arrays
(not differentiated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, jaxpr_as_fun

from deepseek_jax.parallel.pipeline import _jax_internals as pe  # partial evaluation and DCE: no public API

StageFn = Callable[[Any, jnp.ndarray, Any], tuple[tuple[jnp.ndarray, jnp.ndarray], Any]]


def _closed(jaxpr) -> ClosedJaxpr:
    return ClosedJaxpr(jaxpr, ())


def _dce(closed: ClosedJaxpr, used_outputs: list[bool]) -> ClosedJaxpr:
    """`closed` keeping only the used outputs (inputs are kept, unused ones simply ignored)."""
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, used_outputs, instantiate=True)
    return ClosedJaxpr(jaxpr, closed.consts)


def _pick(items, mask):
    return [v for v, m in zip(items, mask) if m]


@dataclasses.dataclass(frozen=True)
class SplitStage:
    """F, B, I and W of one stage function at fixed shapes (see the module docstring).

    Flat conventions: `stash` is the list of residual arrays F saves per micro-batch (avals in
    `stash_avals`); `wstash` the list I saves for W (avals in `wstash_avals`): the output gradients of
    the separable weight uses (the gradients of non-separable ones I returns itself).
    """

    param_tree: Any
    x_aval: jax.ShapeDtypeStruct
    stats_tree: Any
    stash_avals: tuple[jax.ShapeDtypeStruct, ...]
    wstash_avals: tuple[jax.ShapeDtypeStruct, ...]
    _fwd: ClosedJaxpr  # (params, x, ctx) -> (y, loss, stats, residuals); residuals = lin's constants
    _lin: ClosedJaxpr  # (lin constants, t_params, t_x) -> (t_y, t_loss)
    _recompute: ClosedJaxpr  # (params, x, ctx) -> the residuals that do not depend on x
    _stashed: tuple[bool, ...]  # per lin constant: stashed (True) or recomputed
    _known: ClosedJaxpr  # P with the const-only residuals: (lin constants, t_params) -> computed residuals
    _unknown: ClosedJaxpr  # R: (residuals, t_x) -> (t_y, t_loss)
    _res_fwd: tuple  # per R residual: ('const', i) | ('tparam', i) | ('known', j)
    _res_linear: tuple[bool, ...]  # per R residual: depends on t_params
    _deferred: tuple[bool, ...]  # per linear R residual (a u): W contracts it (True) or I finishes it

    # -- helpers ------------------------------------------------------------------------------

    def _flat(self, params):
        leaves, tree = jax.tree.flatten(params)
        if tree != self.param_tree:
            raise ValueError(f"params structure {tree} differs from the traced {self.param_tree}")
        return leaves

    def _lin_consts(self, theta, ctx_leaves, stash):
        """All constants of the linear map: the stashed ones, and the rest recomputed."""
        dummy_x = jnp.zeros(self.x_aval.shape, self.x_aval.dtype)  # unused by `_recompute` (DCE'd)
        recomputed = iter(jaxpr_as_fun(self._recompute)(*theta, dummy_x, *ctx_leaves))
        stash = iter(stash)
        return [next(stash) if s else next(recomputed) for s in self._stashed]

    def _residuals(self, consts, t_theta=None):
        """R's residual inputs. With t_theta (in W) the linear ones, the weight uses u, are P(t_theta);
        without (in I) they are None, R's own inputs, and only the non-linear ones are computed."""
        if t_theta is None:
            nonlinear = self._known_nonlinear_outputs
            unused = [jnp.zeros(a.shape, a.dtype) for a in self._known.in_avals[len(consts):]]  # DCE'd inputs
            values = iter(jaxpr_as_fun(_dce(self._known, nonlinear))(*consts, *unused))
            known_outs = [next(values) if used else None for used in nonlinear]
        else:
            known_outs = jaxpr_as_fun(self._known)(*consts, *t_theta)
        out = []
        for (where, i), linear in zip(self._res_fwd, self._res_linear):
            if linear and t_theta is None:
                out.append(None)
            elif where == "const":
                out.append(consts[i])
            elif where == "tparam":
                out.append(t_theta[i])
            else:
                out.append(known_outs[i])
        return out

    @property
    def _known_nonlinear_outputs(self) -> list[bool]:
        """Which outputs of P are residuals that do not depend on t_params."""
        used = [False] * len(self._known.out_avals)
        for (where, i), linear in zip(self._res_fwd, self._res_linear):
            if where == "known" and not linear:
                used[i] = True
        return used

    # -- the four computations ----------------------------------------------------------------

    def forward(self, params, x, ctx):
        """F: ((y, loss), stats, stash)."""
        theta = self._flat(params)
        ctx_leaves = jax.tree.leaves(ctx)
        outs = jaxpr_as_fun(self._fwd)(*theta, x, *ctx_leaves)
        y, loss = outs[0], outs[1]
        num_stats = self.stats_tree.num_leaves
        stats = jax.tree.unflatten(self.stats_tree, outs[2:2 + num_stats])
        residuals = outs[2 + num_stats:]
        return (y, loss), stats, _pick(residuals, self._stashed)

    def backward(self, params, ctx, stash, ct_y):
        """B: (d params, d x) of sum(loss) with the incoming activation gradient ct_y."""
        theta = self._flat(params)
        consts = self._lin_consts(theta, jax.tree.leaves(ctx), stash)
        lin = lambda t_theta, t_x: tuple(jaxpr_as_fun(self._lin)(*consts, *t_theta, t_x))  # noqa: E731
        d_theta, d_x = jax.linear_transpose(lin, theta, ct_y)((ct_y, jnp.ones((), jnp.float32)))
        return jax.tree.unflatten(self.param_tree, d_theta), d_x

    def input_grad(self, params, ctx, stash, ct_y):
        """I: (d x, wstash, d params) — the input gradient, the output gradients of the weight uses W
        contracts, and the gradient from the weight uses I finishes itself (zero where there are none)."""
        theta = self._flat(params)
        consts = self._lin_consts(theta, jax.tree.leaves(ctx), stash)
        residuals = self._residuals(consts)
        linear_avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a, lin in
                        zip(self._unknown.in_avals, self._res_linear) if lin]

        def chain(u, t_x):
            u = iter(u)
            args = [next(u) if lin else r for r, lin in zip(residuals, self._res_linear)]
            return tuple(jaxpr_as_fun(self._unknown)(*args, t_x))

        u_zero = [jnp.zeros(a.shape, a.dtype) for a in linear_avals]
        ct_u, d_x = jax.linear_transpose(chain, u_zero, ct_y)((ct_y, jnp.ones((), jnp.float32)))
        finished = [ct for ct, deferred in zip(ct_u, self._deferred) if not deferred]
        if finished:
            (d_theta,) = jax.linear_transpose(lambda t: self._weight_uses(consts, t, deferred=False), theta)(
                tuple(finished))
        else:
            d_theta = [jnp.zeros_like(t) for t in theta]
        return d_x, _pick(list(ct_u), self._deferred), jax.tree.unflatten(self.param_tree, list(d_theta))

    def _weight_uses(self, consts, t_theta, deferred: bool) -> tuple:
        """The u = P(t_theta) that W contracts (deferred) or that I finishes."""
        residuals = self._residuals(consts, list(t_theta))
        linear = [r for r, lin in zip(residuals, self._res_linear) if lin]
        return tuple(_pick(linear, [d == deferred for d in self._deferred]))

    def weight_grad(self, params, ctx, stash, wstash):
        """W: d params of the weight uses I left to it, from the stash of F and the wstash of I;
        contractions only."""
        theta = self._flat(params)
        if not wstash:
            return jax.tree.unflatten(self.param_tree, [jnp.zeros_like(t) for t in theta])
        consts = self._lin_consts(theta, jax.tree.leaves(ctx), stash)
        (d_theta,) = jax.linear_transpose(lambda t: self._weight_uses(consts, t, deferred=True), theta)(tuple(wstash))
        return jax.tree.unflatten(self.param_tree, d_theta)


def _contracts(closed: ClosedJaxpr) -> bool:
    """Whether `closed` (or any jaxpr inside it: scan, cond, pjit, remat bodies) has a contraction."""
    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in _CONTRACTIONS:
                return True
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub
                    if isinstance(sub, Jaxpr) and walk(sub):
                        return True
        return False

    return walk(closed.jaxpr)


_CONTRACTIONS = ("dot_general", "ragged_dot", "ragged_dot_general", "conv_general_dilated")


def split_stage(stage_fn: StageFn, params, x, ctx) -> SplitStage:
    """Traces `stage_fn` at the shapes of (params, x, ctx) (arrays or ShapeDtypeStructs) and splits it.

    Call it where the stage will run (e.g. inside the shard_map body), so that any collective the
    stage uses sees its mesh axes.
    """
    theta_avals, param_tree = jax.tree.flatten(params)
    ctx_avals, ctx_tree = jax.tree.flatten(ctx)
    captured = {}

    def fwd(*args):
        theta = jax.tree.unflatten(param_tree, args[:len(theta_avals)])
        x_ = args[len(theta_avals)]
        ctx_ = jax.tree.unflatten(ctx_tree, args[len(theta_avals) + 1:])
        (y, loss), f_lin, stats = jax.linearize(lambda p, xx: stage_fn(p, xx, ctx_), theta, x_, has_aux=True)
        lin = jax.make_jaxpr(lambda tp, tx: f_lin(jax.tree.unflatten(param_tree, tp), tx))(
            list(args[:len(theta_avals)]), x_)
        stats_leaves, captured["stats_tree"] = jax.tree.flatten(stats)
        captured["lin"] = lin.jaxpr
        if jnp.shape(y) != jnp.shape(x_) or jnp.result_type(y) != jnp.result_type(x_):
            raise ValueError(f"a stage must map x {jnp.shape(x_)} {jnp.result_type(x_)} to y of the same "
                             f"shape and dtype, got {jnp.shape(y)} {jnp.result_type(y)}")
        if jnp.shape(loss) != () or jnp.result_type(loss) != jnp.float32:
            raise ValueError(f"a stage's loss must be a float32 scalar, got {jnp.shape(loss)} "
                             f"{jnp.result_type(loss)}")
        return [y, loss, *stats_leaves, *lin.consts]

    fwd_closed = jax.make_jaxpr(fwd)(*theta_avals, x, *ctx_avals)
    lin_open = captured["lin"]
    num_consts = len(lin_open.constvars)
    num_theta = len(theta_avals)
    num_stats = captured["stats_tree"].num_leaves
    first_res = 2 + num_stats

    # Which residuals depend on x (stash them) and which are functions of (params, ctx) (recompute).
    n_in = len(fwd_closed.in_avals)
    x_index = num_theta
    _, _, out_unknown, _ = pe.partial_eval_jaxpr_nounits(
        fwd_closed, [i == x_index for i in range(n_in)], instantiate=False)
    stashed = tuple(out_unknown[first_res:])
    recompute = _dce(fwd_closed, [False] * first_res + [not s for s in stashed])

    # Split the linear map: t_params known, t_x unknown.
    lin_closed = _closed(pe.convert_constvars_jaxpr(lin_open))
    unknowns = [False] * (num_consts + num_theta) + [True]
    known, unknown, _, _, fwds = pe.partial_eval_jaxpr_nounits_fwd(lin_closed, unknowns, instantiate=True)
    # Which computed residuals depend on t_params (linear) and which on the constants only.
    _, _, known_out_linear, _ = pe.partial_eval_jaxpr_nounits(
        known, [i >= num_consts for i in range(num_consts + num_theta)], instantiate=False)
    res_fwd, res_linear = [], []
    computed = 0
    for f in fwds:
        if f is None:
            res_fwd.append(("known", computed))
            res_linear.append(bool(known_out_linear[computed]))
            computed += 1
        elif f < num_consts:
            res_fwd.append(("const", f))
            res_linear.append(False)
        else:
            res_fwd.append(("tparam", f - num_consts))
            res_linear.append(True)
    stash_avals = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
                        for a, s in zip(fwd_closed.out_avals[first_res:], stashed) if s)
    # W takes the weight uses whose part of P contracts; I finishes the rest (t_W itself, pass-throughs).
    deferred = tuple(where == "known" and _contracts(_dce(known, [j == i for j in range(len(known.out_avals))]))
                     for (where, i), lin in zip(res_fwd, res_linear) if lin)
    linear_avals = [a for a, lin in zip(unknown.in_avals, res_linear) if lin]
    wstash_avals = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a, d in zip(linear_avals, deferred) if d)
    x_aval = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    return SplitStage(param_tree=param_tree, x_aval=x_aval, stats_tree=captured["stats_tree"],
                      stash_avals=stash_avals, wstash_avals=wstash_avals, _fwd=fwd_closed, _lin=lin_closed,
                      _recompute=recompute, _stashed=stashed, _known=known, _unknown=unknown, _res_fwd=tuple(res_fwd),
                      _res_linear=tuple(res_linear), _deferred=deferred)
