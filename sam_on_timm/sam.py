"""SAM, its ASAM / layerwise / Fisher variants and SAM-ON, as one optimizer wrapper.

Paper: Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization Needs",
NeurIPS 2023. SAM: Foret et al., ICLR 2021. ASAM: Kwon et al., ICML 2021. Fisher-SAM: Kim et al.,
ICML 2022.

One SAM update:
    g      = grad L(w)                 (loss only, local batch)
    eps    = perturbation of P from g  (perturbations.compute_eps; 0 outside P)
    w_P   += eps                       first_step: the originals of P are saved first
    g'     = grad L(w + eps)
    w_P    = saved originals           copy, bit-exact (never w - eps)
    w      = base_step(w, g')          weight decay / momentum live only here
"""
import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checks import check_arg, check_optimizer_args
from .family import (MOMENTUM_KEYS, check_family_args, gsam_descent, gsam_rho, keeps_momentum_buffer, looksam_direction,
                     looksam_reuse, momentum_buffers)
from .norms import bias_parameters, norm_parameters
from .flat import FlatSet, flat_ok, match_layout
from .optim_state import load_optimizer_state
from .names import MODES, check_base_opt
from .perturbations import VARIANTS, check_eta_used, check_variant, compute_eps

__all__ = ['SAM', 'MODES', 'torch_grad_scaler', 'unscale_grads']



def torch_grad_scaler(scaler) -> Optional['torch.amp.GradScaler']:
    """The torch ``GradScaler`` behind timm's ``NativeScaler``, a ``GradScaler`` itself, or None (also when
    disabled)."""
    scaler = getattr(scaler, '_scaler', scaler)
    if scaler is not None and not scaler.is_enabled():
        return None
    return scaler


def unscale_grads(grads: List[Tensor], scaler) -> Optional[Tensor]:
    """Divide fp16-scaled gradients by the scaler's current scale, in place; returns ``found_inf``.

    eps needs the true gradient (Fisher is not scale invariant). A disabled or absent scaler: None.
    """
    scaler = torch_grad_scaler(scaler)
    if scaler is None or getattr(scaler, '_scale', None) is None:
        return None
    found_inf = torch.zeros(1, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(
        grads, found_inf, scaler._scale.double().reciprocal().float().to(grads[0].device))
    return found_inf


class SAM(torch.optim.Optimizer):
    """Sharpness-aware wrapper around any timm optimizer (``base_opt``, default timm's ``sgd``).

    Args:
        params: parameters or parameter groups (as for any optimizer; they go to the base optimizer).
        base_opt: timm optimizer name for the descent step.
        rho: neighbourhood size (> 0).
        eta: the variant's eta (>= 0); None takes the variant default (Table 10).
        variant: one of ``perturbations.VARIANTS``.
        mode: 'all' (every parameter), 'on' (norm-layer affine parameters only), 'nonorm' (the rest).
        model: the model, to find norm and bias parameters by module type. The timm factory passes it.
        norm_params / bias_params: the same sets given explicitly (instead of ``model``).
        mask: a sparse baseline's mask, injected (``sparse.SparseMask``; the registry makes it for sam-rand,
            ssam-f, ssam-d): an object with ``name`` and ``build(perturbed, norm_params)``, which SAM calls
            once P is known; eps <- mask * eps in ``perturbation``. None: no mask.
        momentum, **base_kwargs: lr, weight_decay, momentum, betas, eps, ... forwarded to the base optimizer
            through timm's factory, which keeps what the base takes and drops the rest (as for any timm name).
        base_args: the same as a dict; how ``create_optimizer_v2`` hands on ``eps`` / ``betas`` (registry.py).
        family: 'sam', or a method of the SAM family (``family.FAMILIES``: 'msam', 'gsam'; docs/design.md,
            section 8), with the plain T = 1 perturbation only.
        interval: the SAM update on every ``interval``-th update (0, K, 2K, ... of the optimizer's counter),
            the base optimizer's plain step between (interval SAM; 1: every update).
        gsam_alpha, rho_min: GSAM's alpha (default 0.0) and the rho at lr_min (default rho: constant rho);
            lr_max / lr_min: the schedule's ends (default: the first group's lr at construction, and 0).
        looksam_alpha: LookSAM's alpha (default 0.7); its k is ``interval``.
        esam_beta, esam_gamma: ESAM's fractions (default 0.6 and 0.5): of P's tensors perturbed, of each chunk's
            samples in the descent; esam_seed: the CPU generator of the tensor draws (the same on every rank).
    """

    def __init__(
            self,
            params: Iterable,
            base_opt: str = 'sgd',
            rho: float = 0.05,
            eta: Optional[float] = None,
            variant: str = 'sam',
            mode: str = 'all',
            model: Optional[nn.Module] = None,
            norm_params: Optional[Iterable[Tensor]] = None,
            bias_params: Optional[Iterable[Tensor]] = None,
            momentum: float = 0.9,
            mask: Optional[Any] = None,
            base_args: Optional[Dict[str, Any]] = None,
            family: str = 'sam',
            interval: int = 1,
            gsam_alpha: Optional[float] = None,
            rho_min: Optional[float] = None,
            lr_max: Optional[float] = None,
            lr_min: Optional[float] = None,
            looksam_alpha: Optional[float] = None,
            esam_beta: Optional[float] = None,
            esam_gamma: Optional[float] = None,
            esam_seed: int = 0,
            **base_kwargs,
    ) -> None:
        check_variant(variant)
        if mode not in MODES:
            raise ValueError(f"unknown SAM mode '{mode}'; valid: {', '.join(MODES)}")
        check_arg('rho', rho)
        check_family_args(family, interval, gsam_alpha, rho_min, rho, looksam_alpha=looksam_alpha,
                          esam_beta=esam_beta, esam_gamma=esam_gamma)
        if family != 'sam' and variant != 'sam':
            raise ValueError(f"'{family}' perturbs with T = 1 only; variant '{variant}' is an option of the sam names")
        check_eta_used(variant, eta)
        eta = VARIANTS[variant].default_eta if eta is None else eta
        check_arg('eta', eta)
        check_base_opt(base_opt)
        if base_args is not None and not isinstance(base_args, Mapping):
            raise ValueError(f'base_args must be a dict of base optimizer arguments, got {type(base_args).__name__}')
        base_kwargs = {**base_kwargs, **(base_args or {})}
        check_optimizer_args({'momentum': momentum, **base_kwargs})
        if model is not None:
            norm_params = norm_parameters(model) if norm_params is None else norm_params
            bias_params = bias_parameters(model) if bias_params is None else bias_params
        name = f"{family}{'' if mode == 'all' else '-' + mode}{'' if variant == 'sam' else '-' + variant}"
        if mode != 'all':
            if norm_params is None:
                raise ValueError(
                    f"'{name}' must know the normalization parameters: pass the model to create_optimizer_v2, "
                    f"or norm_params=sam_on_timm.norm_parameters(model)")
            norm_params = set(norm_params)
            if not norm_params:
                raise ValueError(
                    f"'{name}': the model has no normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, "
                    f"EvoNorm, ...); use mode 'all' (e.g. '{name.replace('-' + mode, '')}') or a model with norm "
                    f"layers")
        bias_set = None if bias_params is None else set(bias_params)
        if variant == 'eleml2orig' and bias_set is None:
            raise ValueError(f"'{name}' must know which parameters are biases: pass the model, or bias_params=...")

        super().__init__(params, {})
        from timm.optim import create_optimizer_v2  # late import: timm's factory imports optimizers lazily
        self.base_optimizer = create_optimizer_v2(self.param_groups, opt=base_opt, momentum=momentum, **base_kwargs)
        for group in self.base_optimizer.param_groups:   # timm's factory puts weight decay in the groups
            check_optimizer_args(group)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state

        self.name, self.variant, self.mode, self.rho, self.eta, self.base_opt = name, variant, mode, rho, eta, base_opt
        self.family, self.interval = family, interval
        self.updates = 0   # base steps taken (interval SAM's phase; part of the state)
        self.gsam_alpha = 0.0 if gsam_alpha is None else float(gsam_alpha)
        self.rho_min = rho if rho_min is None else float(rho_min)
        if family == 'gsam':
            lr_max = float(self.param_groups[0]['lr']) if lr_max is None else float(lr_max)
            lr_min = 0.0 if lr_min is None else float(lr_min)
            check_optimizer_args({'lr': lr_max}, {'lr': 'lr_max'})
            check_optimizer_args({'lr': lr_min}, {'lr': 'lr_min'})
        self.lr_max, self.lr_min = lr_max, lr_min
        self._ascent_grad: Optional[List[Tensor]] = None   # GSAM, LookSAM: g at w over P, until the descent
        self.looksam_alpha = 0.7 if looksam_alpha is None else float(looksam_alpha)
        self.looksam_gv: Optional[List[Tensor]] = None     # LookSAM's kept g_v over P (part of the state)
        self._reuse_pending = False   # LookSAM: the coming base step is a reuse step (g + alpha ... g_v)
        self.esam_beta = 0.6 if esam_beta is None else float(esam_beta)
        self.esam_gamma = 0.5 if esam_gamma is None else float(esam_gamma)
        self.esam_generator = torch.Generator().manual_seed(esam_seed) if family == 'esam' else None
        self.swp: Optional[List[bool]] = None   # ESAM: the tensors of P this update perturbs (draw_swp)
        if family == 'msam':
            momentum_ok = self.base_optimizer.defaults.get('momentum', 0) or 'betas' in self.base_optimizer.defaults
            if not momentum_ok:
                raise ValueError(f"'{name}' perturbs along the base optimizer's momentum: base '{base_opt}' has "
                                 f"none (momentum {self.base_optimizer.defaults.get('momentum')}); use momentum > 0 "
                                 f"or an Adam-style base")
            if keeps_momentum_buffer(self.base_optimizer) is False:
                raise ValueError(f"'{name}' perturbs along the base optimizer's momentum: base '{base_opt}' keeps "
                                 f"none under the state keys {' / '.join(MOMENTUM_KEYS)}; use an SGD (momentum > 0) "
                                 f"or Adam-style base")
        self._norm_set, self._bias_set = norm_params, bias_set   # kept for groups added later
        self._backup: Optional[List[Tensor]] = None   # originals of P only, reused every step
        self._flat: Optional[FlatSet] = None          # eps's working buffer on CUDA (flat.flat_ok)
        self._layout_key = None   # where P's storage is: a change (model.to(), channels_last) renews both
        self.skipped_count: Optional[Tensor] = None   # cumulative skips, float32 on device (no host sync)
        self.perturbed: List[Tensor] = [p for group in self.param_groups for p in group['params'] if self._selects(p)]
        if not self.perturbed:
            raise ValueError(f"'{name}': no parameter that requires grad is in the perturbed set")
        self.is_bias: Optional[List[bool]] = None if bias_set is None else [p in bias_set for p in self.perturbed]
        self.mask = None   # sparse baselines: built over P by the injected spec (sparse.SparseMask)
        if mask is not None:
            self.name = name = mask.name
            self.mask = mask.build(self.perturbed, norm_params)
        self._n_groups = len(self.param_groups)
        self.is_perturbed = False
        self.last_eps_norm: Optional[Tensor] = None
        self.last_skipped: Optional[Tensor] = None

    def _selects(self, p: Tensor) -> bool:
        """Whether the mode puts ``p`` in the perturbed set (a frozen parameter never)."""
        in_norm = self.mode == 'all' or p in self._norm_set
        return p.requires_grad and (in_norm if self.mode != 'nonorm' else not in_norm)

    def add_param_group(self, param_group: Dict) -> None:
        """A new group goes to the base optimizer (defaults filled in as for any group), and its
        parameters that the mode selects join the perturbed set (e.g. layers unfrozen during fine-tuning)."""
        if 'base_optimizer' not in self.__dict__:   # torch.optim.Optimizer.__init__ building the first groups
            return super().add_param_group(param_group)
        if self.is_perturbed:
            raise RuntimeError(f'{self.name}: add_param_group() between first_step() and second_step()')
        self.adopt_new_groups()
        self.base_optimizer.add_param_group(param_group)   # the groups list is shared: self.param_groups has it
        self.adopt_new_groups()

    def adopt_new_groups(self) -> None:
        """Groups added since the perturbed set was built (by add_param_group, or through a wrapper such as
        timm's Lookahead, whose add_param_group appends to the shared list): what the mode selects joins P.
        Called by ``perturb`` / ``first_step`` and by ``train_step`` before it reads ``perturbed``."""
        if len(self.param_groups) == self._n_groups:
            return
        new = [p for group in self.param_groups[self._n_groups:] for p in group['params'] if self._selects(p)]
        self.perturbed = self.perturbed + new   # a new list: the backup / flat buffer are keyed on it and renewed
        if self.mask is not None:
            self.mask.extend(new)
        if self.is_bias is not None:
            self.is_bias = self.is_bias + [p in self._bias_set for p in new]
        self._n_groups = len(self.param_groups)

    # -- the algorithm ------------------------------------------------------------------------
    @torch.no_grad()
    def perturbation(self, grads: Sequence[Optional[Tensor]], found_inf: Optional[Tensor] = None,
                     grads_writable: bool = False, weight: float = 1.0) -> Tuple[List[Tensor], Tensor, Tensor]:
        """eps of P from the ascent gradient ``grads`` (one per tensor of ``self.perturbed``; None: zero),
        with everything a perturbation involves: the variant's formula (``compute_eps``), the sparse
        mask (eps <- mask * eps; ssam-d's pending mask update first), and the counters
        (``last_eps_norm``, ``last_skipped``, ``skipped_count``). The weights are not touched.

        The one place eps is made: ``perturb`` (sequential chunks, ``first_step``, ``step(closure)``) and
        the batched chunk path of ``train_step`` (which adds eps per chunk inside its ghost norms) both
        call it, so a path cannot drop a mask or miss a count. Returns ``(eps, ||eps||, skipped)``;
        ``found_inf`` non-zero (fp16 overflow) skips the perturbation. On the flat (CUDA) path eps is a
        view of a buffer reused by the next call.

        The family (docs/design.md, section 8): ``msam`` ignores ``grads`` and perturbs along the base
        optimizer's momentum, eps = -rho m / ||m||; ``gsam`` keeps ``weight * grads`` (summed over the
        chunks of an update: g at w, for the descent gradient) and perturbs with rho_t (``current_rho``).
        """
        params = self.perturbed
        if len(grads) != len(params):   # e.g. read before a group was added: call adopt_new_groups() first
            raise ValueError(f'{self.name}: got {len(grads)} gradients for {len(params)} perturbed tensors')
        if self.family == 'msam':
            grads, found_inf, grads_writable = self._momentum_direction(), None, True
        rho = self.current_rho()
        if self.family == 'esam':   # SWP: only the drawn tensors, eps scaled by 1 / beta
            if self.swp is None or len(self.swp) != len(params):
                self.draw_swp()
            grads = [g if s else None for g, s in zip(grads, self.swp)]
            rho = rho / self.esam_beta
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        # GSAM / LookSAM keep g; before compute_eps, which may write into writable grads
        if (self.family == 'gsam' and self.gsam_alpha != 0) or self.family == 'looksam':
            kept = [g.detach().float() * weight if g.dtype != torch.float64 else g.detach() * weight for g in grads]
            if self._ascent_grad is None or len(self._ascent_grad) != len(kept):
                self._ascent_grad = kept
            else:
                torch._foreach_add_(self._ascent_grad, kept)
        if self.mask is not None:
            self.mask.before_perturb(grads)   # ssam-d: a requested mask update, scored by this gradient
        # model.to(dtype / device / memory_format) gives P new storage: renew the backup and flat buffers
        key = (params[0].device, tuple(p.data_ptr() for p in params))
        if key != self._layout_key:
            self._layout_key, self._backup = key, None
            self._flat = FlatSet(params) if flat_ok(params) else None
        eps, eps_norm, skipped = compute_eps(
            self.variant, params, grads, rho, self.eta, self.is_bias, found_inf=found_inf,
            grads_writable=grads_writable, flat=self._flat)
        if self.mask is not None:
            eps_norm = self.mask.apply(eps)
            skipped = torch.maximum(skipped, (eps_norm == 0).to(skipped.dtype))
        self.last_eps_norm, self.last_skipped = eps_norm, skipped
        # float32 whatever P's dtype (a bfloat16 count would stop at 256)
        self.skipped_count = skipped.float() if self.skipped_count is None else self.skipped_count + skipped
        return eps, eps_norm, skipped

    def current_rho(self) -> float:
        """The rho of this update: ``rho``, or GSAM's rho_t from the first group's lr (``family.gsam_rho``)."""
        if self.family != 'gsam':
            return self.rho
        return gsam_rho(self.rho, self.rho_min, float(self.param_groups[0]['lr']), self.lr_max, self.lr_min)

    def draw_swp(self) -> List[bool]:
        """ESAM: draw this update's subset of P (each tensor kept with probability beta) from the optimizer's
        CPU generator, so every rank draws the same; kept in ``swp`` until the next draw."""
        u = torch.rand(len(self.perturbed), generator=self.esam_generator)
        self.swp = (u < self.esam_beta).tolist()
        return self.swp

    def is_sam_update(self) -> bool:
        """Whether the coming update is a SAM update (always, unless ``interval`` > 1: updates 0, K, 2K, ...).
        ``train_step`` and ``step(closure)`` take the base optimizer's plain step otherwise; a user's own
        first_step / second_step loop asks this itself."""
        return self.updates % self.interval == 0

    @property
    def needs_ascent(self) -> bool:
        """Whether eps needs an ascent pass (a gradient at w): not for Momentum-SAM."""
        return self.family != 'msam'

    def _momentum_direction(self) -> List[Optional[Tensor]]:
        """-m over P (the ascent direction of Momentum-SAM), new tensors; None where no buffer exists yet."""
        bufs = momentum_buffers(self.state, self.perturbed)
        if all(b is None for b in bufs) and any(self.state.get(p) for p in self.perturbed):
            raise RuntimeError(f"{self.name}: the base optimizer '{self.base_opt}' keeps no momentum buffer "
                               f"(state keys momentum_buffer / exp_avg) to perturb along")
        return [None if b is None else torch.neg(b.detach()).to(p.dtype) for b, p in zip(bufs, self.perturbed)]

    @torch.no_grad()
    def descent_gradient(self) -> None:
        """GSAM: ``.grad`` of P (g_p, the true descent gradient) becomes g_p - alpha g_orth with the kept g
        (``family.gsam_descent``); the kept g is dropped. A no-op for the others, or when nothing is kept.
        ``train_step`` calls it before clipping; the base step calls it if it is still pending."""
        kept, self._ascent_grad = self._ascent_grad, None
        reuse, self._reuse_pending = self._reuse_pending, False
        if self.family == 'looksam':
            grads = [p.grad for p in self.perturbed]
            if any(g is None for g in grads):   # a tensor of P the loss did not reach: zero gradient
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.perturbed, grads)]
            if kept is not None:
                g_v = looksam_direction(grads, [g.to(d.dtype) for g, d in zip(kept, grads)])
                if g_v is not None:
                    self.looksam_gv = g_v
            elif reuse and self.looksam_gv is not None:
                looksam_reuse([p.grad for p in self.perturbed if p.grad is not None],
                              [v for p, v in zip(self.perturbed, self.looksam_gv) if p.grad is not None],
                              self.looksam_alpha)
            return
        if kept is None or self.gsam_alpha == 0:
            return
        pairs = [(p.grad, g) for p, g in zip(self.perturbed, kept) if p.grad is not None]
        if pairs:
            gsam_descent([d for d, _ in pairs], [g.to(d.dtype) for d, g in pairs], self.gsam_alpha)

    @torch.no_grad()
    def perturb(self, grads: Optional[Sequence[Optional[Tensor]]] = None, found_inf: Optional[Tensor] = None,
                grads_writable: bool = False, weight: float = 1.0) -> Tensor:
        """w_P <- w_P + eps, eps from ``perturbation(grads)``; ``grads`` default to ``.grad``.

        Returns ||eps|| (0-dim tensor). The originals of P are saved first; ``restore()`` puts them back.
        ``weight``: GSAM's share of this gradient in the update's g (the chunk's descent weight).
        """
        if self.is_perturbed:
            raise RuntimeError(f"{self.name}: perturb() called twice without restore()")
        if grads is None:
            self.adopt_new_groups()
            grads = [p.grad for p in self.perturbed]
        eps, eps_norm, _ = self.perturbation(grads, found_inf, grads_writable, weight)
        params = self.perturbed
        if self._backup is None:
            # once: later steps copy into these buffers. A plain clone, not torch._foreach_clone (absent
            # from torch 2.11) nor x * 1.0 (not bit-exact when denormals are flushed)
            self._backup = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(self._backup, params)
        self.is_perturbed = True   # from here on restore() puts w back, also if the add below raises
        try:
            torch._foreach_add_(params, eps if self._flat is not None else match_layout(eps, params))
        except BaseException:
            self.restore()
            raise
        return eps_norm

    def unperturbed(self) -> List[Tensor]:
        """The optimizer's parameters outside the perturbed set (the lean ascent switches their grads off)."""
        ids = {id(p) for p in self.perturbed}
        return [p for group in self.param_groups for p in group['params'] if id(p) not in ids]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved originals of P back (a copy: bit-exact). No-op when not perturbed."""
        if self.is_perturbed:
            torch._foreach_copy_(self.perturbed, self._backup)
            self.is_perturbed = False

    def first_step(self, zero_grad: bool = False, scaler: Optional['torch.amp.GradScaler'] = None) -> None:
        """Ascent: w <- w + eps from the current ``.grad``.

        With float16, pass the ``GradScaler`` whose scaled loss made ``.grad``: eps is then computed
        from the unscaled gradient (``.grad`` itself is left as it is) and an overflow skips it.
        """
        grads = found_inf = None
        writable = False
        self.adopt_new_groups()
        if self.family == 'esam':   # a new subset of P for every update
            self.draw_swp()
        if torch_grad_scaler(scaler) is not None:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.perturbed]
            found_inf, writable = unscale_grads(grads, scaler), True
        self.perturb(grads, found_inf, grads_writable=writable)
        if zero_grad:
            try:
                self.zero_grad()
            except BaseException:
                self.restore()
                raise

    @contextlib.contextmanager
    def perturbed_weights(self, zero_grad: bool = False,
                          scaler: Optional['torch.amp.GradScaler'] = None) -> Iterator['SAM']:
        """``first_step(zero_grad, scaler)`` on entry, ``restore()`` on exit, also when the block raises:
        the second pass of a user's own loop runs inside, the weights are w again after it, whatever
        happens (an out-of-memory error caught and retried with a smaller batch finds w, not w + eps).

            loss_fn(model(x), y).backward()
            with opt.perturbed_weights(zero_grad=True):
                loss_fn(model(x), y).backward()     # at w + eps
            opt.second_step(zero_grad=True)          # base step at w with the gradient at w + eps
        """
        self.first_step(zero_grad=zero_grad, scaler=scaler)
        try:
            yield self
        finally:
            self.restore()

    def second_step(self, zero_grad: bool = False, scaler: Optional['torch.amp.GradScaler'] = None) -> None:
        """Restore the unperturbed weights, then take the base step with the gradient at w + eps.

        With float16, pass the ``GradScaler`` (or timm's ``NativeScaler``): the step goes through
        ``scaler.step`` (unscale, skip on overflow); a skipped step leaves the weights unperturbed too.
        Without a scaler this is ``step()``, so torch LR schedulers see the step.
        """
        self.restore()   # first: w is back even if the scaler or the base step raises
        scaler = torch_grad_scaler(scaler)
        if scaler is not None:
            scaler.step(self)
        else:
            self.step()
        if zero_grad:
            self.zero_grad()

    # GradScaler.step(opt) then calls step() on every update, overflow or not, with the scale and the
    # overflow flag as attributes ``grad_scale`` / ``found_inf``: a skipped step still restores w.
    _step_supports_amp_scaling = True

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """With a closure (forward + backward, returning the loss): a full SAM step.
        Without: restore if perturbed, then the base step; what ``GradScaler.step(opt)`` calls, with
        ``found_inf`` set: an fp16 overflow skips the base step, the weights are restored all the same.
        If the closure raises, the weights are restored before the exception goes on."""
        if closure is None:
            self._restore_and_descend()
            return None
        closure = torch.enable_grad()(closure)
        if not self.is_sam_update():   # interval SAM: a plain base step (LookSAM: its reuse step)
            self._ascent_grad = None
            self._reuse_pending = self.family == 'looksam'
            loss = closure()
        elif not self.needs_ascent:    # Momentum-SAM: one pass, at w + eps
            with self.perturbed_weights(zero_grad=True):
                loss = closure()
        else:
            loss = closure()   # esam: a closure gives no per-sample losses, SWP only (docs/design.md, 8)
            with self.perturbed_weights(zero_grad=True):
                closure()
        self._restore_and_descend()   # not self.step(): step hooks fire once per SAM step
        return loss

    def _restore_and_descend(self) -> None:
        self.restore()
        self.updates += 1   # every update counts, a skipped one too (interval SAM's phase)
        found_inf = getattr(self, 'found_inf', None)   # set by GradScaler.step only
        if found_inf is not None:
            if found_inf.item():   # the same host sync GradScaler makes to skip a step
                self._ascent_grad, self._reuse_pending = None, False
                return
            if getattr(self, 'grad_scale', None) is not None:   # not unscaled yet: as GradScaler.unscale_
                grads = [p.grad for g in self.param_groups for p in g['params'] if p.grad is not None]
                inv_scale = self.grad_scale.double().reciprocal().float()
                for device in {g.device for g in grads}:
                    torch._foreach_mul_([g for g in grads if g.device == device], inv_scale.to(device))
        self.descent_gradient()   # GSAM, when train_step has not done it (a user's own loop)
        self.base_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # -- state --------------------------------------------------------------------------------
    def _refuse_while_perturbed(self, what: str) -> None:
        if self.is_perturbed:
            raise RuntimeError(f'{self.name}: {what} while the weights are perturbed (w + eps, between first_step() '
                               f'and second_step()); call it after second_step() or restore()')

    def state_dict(self) -> Dict:
        """The base optimizer's state (momentum buffers, step counts, param groups); a sparse mask under 'sam_mask'.

        Refused (RuntimeError) while the weights are perturbed: a checkpoint taken then would pair this
        state with ``model.state_dict()`` at w + eps (docs/robustness.md, "Exceptions in the two-pass step").
        """
        self._refuse_while_perturbed('state_dict()')
        state = self.base_optimizer.state_dict()
        state['sam_updates'] = self.updates
        if self.esam_generator is not None:
            state['sam_esam_rng'] = self.esam_generator.get_state()
        if self.looksam_gv is not None:
            state['sam_looksam_gv'] = [v.detach().clone() for v in self.looksam_gv]
        if self.mask is not None:
            state['sam_mask'] = self.mask.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict) -> None:
        """The base optimizer's state; one saved by another kind of optimizer is refused (ValueError).
        A sparse baseline's mask comes from 'sam_mask'. Refused while the weights are perturbed."""
        self._refuse_while_perturbed('load_state_dict()')
        if self.mask is not None:   # checked before anything is loaded: a refused state changes nothing
            if 'sam_mask' not in state_dict:
                raise ValueError(f"'{self.name}': the optimizer state holds no perturbation mask")
            self.mask.check_state(state_dict['sam_mask'])
        updates = state_dict.get('sam_updates', 0)
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"'{self.name}': the optimizer state's update count is not a count: {updates!r}")
        load_optimizer_state(self.base_optimizer, {k: v for k, v in state_dict.items()
                                                   if k not in ('sam_mask', 'sam_updates', 'sam_looksam_gv',
                                                                'sam_esam_rng')})
        self.updates = updates
        if self.esam_generator is not None and state_dict.get('sam_esam_rng') is not None:
            self.esam_generator.set_state(state_dict['sam_esam_rng'])
        g_v = state_dict.get('sam_looksam_gv')
        self.looksam_gv = None if g_v is None else [v.to(device=p.device, dtype=p.dtype).clone()
                                                    for v, p in zip(g_v, self.perturbed)]
        if self.mask is not None:
            self.mask.load_state_dict(state_dict['sam_mask'])
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __getstate__(self) -> Dict:
        # torch.optim.Optimizer pickles only defaults/state/param_groups, which would drop the base
        # optimizer and the perturbed set: keep the whole object (deepcopy, pickle).
        state = self.__dict__.copy()
        state.update(_flat=None, _layout_key=None)   # scratch buffers: rebuilt on first use (with the backup)
        return state

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.perturbed)
        return (f'{self.__class__.__name__}({self.name}, rho={self.rho}, eta={self.eta}, '
                f'perturbed={len(self.perturbed)} tensors / {n:,} elements, base={self.base_optimizer!r})')
