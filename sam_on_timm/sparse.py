"""Sparse-perturbation baselines of the paper (Section 5.1, Appendix B.3): a 0/1 mask on eps.

    eps = rho * g / ||g||_2 over the whole perturbed set, then eps <- mask * eps

so the perturbation has norm rho * ||mask * g|| / ||g|| <= rho, as in the public code of Mi et al. 2022
(the mask multiplies eps after it is normalised). A fraction ``sparsity`` of the elements is left out.

- ``rand`` (``sam-rand``): a fixed random mask (the paper's SAM-rand), drawn once from ``seed`` on
  the CPU, so every rank draws the same; by default at the sparsity SAM-ON has on the same model.
- ``fisher`` (``ssam-f``, Mi et al. 2022, "Make Sharpness-Aware Minimization Stronger: A Sparsified
  Perturbation Approach"): the top-k elements of the empirical Fisher diagonal
  F_i = sum_n (d loss(x_n, y_n) / d w_i)^2 over ``fisher_samples`` single samples, recomputed every
  ``update_epochs`` epochs. Until the first computation the mask is empty (no perturbation).
- ``dynamic`` (``ssam-d``): starts from a random mask; every ``update_epochs`` epochs it drops the
  live elements with the smallest |g| (g: the ascent gradient of the update) and regrows as many,
  at random, among the elements that were dead before (at most all of them); the fraction dropped is
  ``drop_rate * (1 + cos(pi * epoch / epochs)) / 2``. The number of live elements never changes.

Defaults as in Mi et al.'s code (github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization): masks updated
every 5 epochs, 1024 Fisher samples, drop rate 0.5, death by |g| and random growth; sparsity 0.5, their
paper's recommendation (their code's default is 0.2). Where this deviates from that code: the live
count is ``N - round(N * sparsity)`` exactly (their int() roundings can lose one element per update);
a mask update happens before the first update of its epoch and applies to it (theirs after that
update's ascent, so that SSAM-F's first update is unperturbed and SSAM-D's new mask starts with the
second); SSAM-F's single-sample passes leave BatchNorm running statistics untouched (theirs update
them), and under DDP the Fisher sums and the |g| scores are summed over ranks, so that every rank
holds the same mask. The mask and its random generator are part of the optimizer state: a resumed
run continues with the same mask and the same draws.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .batches import batch_rows, frozen_bn_stats, take_rows
from .checks import check_number
from .names import SPARSE_NAMES

__all__ = ['SPARSE_KINDS', 'SPARSE_NAMES', 'MASK_ARGS', 'SparseMask', 'PerturbationMask', 'live_count',
           'fisher_diagonal']

SPARSE_KINDS = ('rand', 'fisher', 'dynamic')


# the optimizer arguments of the sparse baselines (create_optimizer_v2 / train.py) -> SparseMask field
MASK_ARGS = {'sparsity': 'sparsity', 'mask_seed': 'seed', 'mask_update_epochs': 'update_epochs',
             'fisher_samples': 'fisher_samples', 'drop_rate': 'drop_rate'}


def live_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` elements a mask of ``sparsity`` keeps (at least 1)."""
    return max(1, numel - int(round(numel * sparsity)))


def _all_reduce_sum(tensors: List[Tensor]) -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


@dataclass(frozen=True)
class SparseMask:
    """A sparse baseline's mask as the optimizer is to build it: ``SAM(..., mask=SparseMask('rand'))``.

    Injected into SAM (the registry makes one per sparse name from the optimizer arguments, ``MASK_ARGS``),
    so that the optimizer knows no mask kind: it calls ``build`` over its perturbed set once P is known.
    ``sparsity`` None: SAM-ON's sparsity on the model for ``rand``, 0.5 for the others.
    """
    kind: str
    sparsity: Optional[float] = None
    seed: int = 0
    update_epochs: int = 5
    fisher_samples: int = 1024
    drop_rate: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in SPARSE_KINDS:
            raise ValueError(f"unknown sparse mask '{self.kind}'; valid: {', '.join(SPARSE_KINDS)}")

    @property
    def name(self) -> str:
        """The optimizer name of this baseline (sam-rand, ssam-f, ssam-d)."""
        return SPARSE_NAMES[self.kind]

    def build(self, params: Sequence[Tensor], norm_params: Optional[Iterable[Tensor]]) -> 'PerturbationMask':
        """The mask over ``params`` (SAM's perturbed set); ``norm_params``, the model's normalization
        parameters, give sam-rand's default sparsity: the fraction of P that SAM-ON leaves out."""
        sparsity = self.sparsity
        if sparsity is None and self.kind == 'rand':
            if norm_params is None:
                raise ValueError(f"'{self.name}' needs sparsity=..., or the model to take SAM-ON's sparsity from it")
            norm = set(norm_params)
            sparsity = 1.0 - sum(p.numel() for p in params if p in norm) / sum(p.numel() for p in params)
        return PerturbationMask(self.kind, params, 0.5 if sparsity is None else sparsity, self.seed,
                                self.update_epochs, self.fisher_samples, self.drop_rate)


class PerturbationMask:
    """The 0/1 mask over the perturbed tensors of a ``SAM`` optimizer (one tensor each, their dtype)."""

    def __init__(self, kind: str, params: Sequence[Tensor], sparsity: float, seed: int,
                 update_epochs: int, fisher_samples: int, drop_rate: float) -> None:
        """Every setting is given (their defaults live in ``SparseMask``, the one place that has them)."""
        if kind not in SPARSE_KINDS:
            raise ValueError(f"unknown sparse mask '{kind}'; valid: {', '.join(SPARSE_KINDS)}")
        check_number(sparsity, 'sparsity', 0, 1, False, True)   # the fraction of elements not perturbed
        if not (isinstance(update_epochs, int) and update_epochs >= 1):
            raise ValueError(f'the mask update interval must be a positive number of epochs, got {update_epochs}')
        if not (isinstance(fisher_samples, int) and fisher_samples >= 1):
            raise ValueError(f'fisher_samples must be a positive integer, got {fisher_samples}')
        check_number(drop_rate, 'drop_rate', 0, 1)
        self.kind, self.sparsity, self.seed = kind, float(sparsity), seed
        self.update_epochs, self.fisher_samples, self.drop_rate = update_epochs, fisher_samples, drop_rate
        self.generator = torch.Generator().manual_seed(seed)   # CPU: the same draws on every rank
        self.numel = sum(p.numel() for p in params)
        self.live = live_count(self.numel, self.sparsity)
        self.pending_drop: Optional[float] = None   # ssam-d: drop fraction of the update requested for this epoch
        flat = torch.zeros(self.numel)
        if kind != 'fisher':   # ssam-f: empty until its first Fisher computation
            flat[torch.randperm(self.numel, generator=self.generator)[:self.live]] = 1.0
        self.masks = self._split(flat, params)

    @staticmethod
    def _split(flat: Tensor, params: Sequence[Tensor]) -> List[Tensor]:
        out, i = [], 0
        for p in params:
            out.append(flat[i:i + p.numel()].view(p.shape).to(device=p.device, dtype=p.dtype))
            i += p.numel()
        return out

    def extend(self, params: Sequence[Tensor]) -> None:
        """Tensors that joined the perturbed set later (a parameter group added) join the mask at its sparsity.
        sam-rand and ssam-d draw theirs at random, as their first mask was drawn; ssam-f perturbs none of them
        until its next Fisher mask, which ranks every element together."""
        n = sum(p.numel() for p in params)
        if n == 0:
            return
        flat = torch.zeros(n)
        self.numel += n
        if self.kind == 'fisher':
            self.live = live_count(self.numel, self.sparsity)
        else:
            k = live_count(n, self.sparsity)
            flat[torch.randperm(n, generator=self.generator)[:k]] = 1.0
            self.live += k
        self.masks = self.masks + self._split(flat, params)

    def _flat(self) -> Tensor:
        return torch.cat([m.detach().reshape(-1).float().cpu() for m in self.masks])

    def density(self) -> float:
        """Fraction of elements perturbed."""
        return float(sum(m.sum().item() for m in self.masks)) / self.numel

    # -- applying ---------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, eps: List[Tensor]) -> Tensor:
        """eps <- mask * eps in place; returns the new ||eps||_2."""
        masks = [m if m.device == e.device else m.to(e.device) for m, e in zip(self.masks, eps)]
        torch._foreach_mul_(eps, masks)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(eps)))

    # -- updates --------------------------------------------------------------------------------------
    def epoch_start(self, epoch: int, epochs: int,
                    fisher: Optional[Callable[[], Tuple[List[Tensor], int]]] = None) -> bool:
        """Called at the start of every epoch; returns whether the mask changes in it.

        ``fisher``: for ``ssam-f``, a function returning the Fisher sums of the perturbed tensors (and the
        number of samples they cover), e.g. ``lambda: fisher_diagonal(...)``.
        """
        if self.kind == 'rand' or epoch % self.update_epochs:
            return False
        if self.kind == 'fisher':
            if fisher is None:
                raise ValueError('ssam-f needs samples for its Fisher mask: pass fisher=...')
            self.set_fisher_mask(fisher()[0])
        else:   # the drop fraction decays with a cosine over the run
            self.pending_drop = self.drop_rate * (1 + math.cos(math.pi * epoch / max(1, epochs))) / 2
        return True

    @torch.no_grad()
    def set_fisher_mask(self, fisher: Sequence[Tensor]) -> None:
        """Keep the ``live`` elements with the largest Fisher value (sums over ranks first)."""
        fisher = [f.detach().float().clone() for f in fisher]
        _all_reduce_sum(fisher)
        flat_f = torch.cat([f.reshape(-1).cpu() for f in fisher])
        flat = torch.zeros(self.numel)
        flat[torch.topk(flat_f, self.live, sorted=False).indices] = 1.0
        self.masks = self._split(flat, self.masks)

    @torch.no_grad()
    def before_perturb(self, grads: Sequence[Tensor]) -> None:
        """ssam-d: a requested drop-and-regrow, scored by the update's ascent gradient |g| (summed over ranks)."""
        if self.pending_drop is None:
            return
        scores = [g.detach().abs().float() for g in grads]
        _all_reduce_sum(scores)
        score = torch.cat([s.reshape(-1).cpu() for s in scores])
        mask = self._flat().bool()
        alive, dead = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
        n_drop = min(int(self.live * self.pending_drop), dead.numel())   # regrown among the dead of before
        keep = alive[torch.topk(score[alive], self.live - n_drop, sorted=False).indices]   # the largest |g| stay
        grow = dead[torch.randperm(dead.numel(), generator=self.generator)[:n_drop]]
        flat = torch.zeros(self.numel)
        flat[keep] = 1.0
        flat[grow] = 1.0
        self.masks = self._split(flat, self.masks)
        self.pending_drop = None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """Plain tensors and numbers (loads with ``torch.load(weights_only=True)``)."""
        return {'kind': self.kind, 'sparsity': self.sparsity, 'seed': self.seed, 'live': self.live,
                'mask': self._flat().bool(), 'generator': self.generator.get_state(),
                'pending_drop': self.pending_drop}

    def check_state(self, state: Dict) -> None:
        """ValueError unless ``state`` is a mask of this kind over as many elements."""
        if state['kind'] != self.kind or state['mask'].numel() != self.numel:
            raise ValueError(f"the checkpoint's mask ({state['kind']}, {state['mask'].numel()} elements) does not fit "
                             f"this optimizer ({self.kind}, {self.numel} elements)")

    def load_state_dict(self, state: Dict) -> None:
        self.check_state(state)
        self.sparsity, self.seed, self.live = state['sparsity'], state['seed'], state['live']
        self.masks = self._split(state['mask'].float(), self.masks)
        self.generator.set_state(state['generator'])
        self.pending_drop = state['pending_drop']


def fisher_diagonal(model: nn.Module, params: Sequence[Tensor], batches: Iterable[Tuple[Tensor, Tensor]],
                    loss_fn: Callable[[Tensor, Tensor], Tensor], num_samples: int) -> Tuple[List[Tensor], int]:
    """Empirical Fisher diagonal sum_n g_n^2 of ``params``, g_n the gradient of the loss of sample n alone,
    over the first ``num_samples`` samples of ``batches``, each passed through the model alone in training
    mode, as in Mi et al.'s code. Running statistics of norm layers are left as they are, and the model's
    mode is restored afterwards."""
    fisher = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.train()
    try:
        with frozen_bn_stats(model), torch.enable_grad():
            n = _accumulate_fisher(model, params, batches, loss_fn, num_samples, fisher)
    finally:
        model.train(was_training)
    return fisher, n


def _accumulate_fisher(model: nn.Module, params: Sequence[Tensor], batches: Iterable[Tuple[Tensor, Tensor]],
                       loss_fn: Callable[[Tensor, Tensor], Tensor], num_samples: int, fisher: List[Tensor]) -> int:
    """fisher += g_n^2 for the first ``num_samples`` single samples of ``batches`` (image tensors or NaFlex dicts);
    returns how many it used."""
    n = 0
    for x, y in batches:
        for i in range(batch_rows(x)):
            if n >= num_samples:
                return n
            try:
                out = model(take_rows(x, slice(i, i + 1)))
            except ValueError as e:   # BatchNorm in training mode over a 1x1 map of one sample
                raise ValueError(f'ssam-f: one sample cannot pass the model in training mode ({e}); use a larger '
                                 f'input size') from None
            grads = torch.autograd.grad(loss_fn(out, y[i:i + 1]), list(params), allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f.addcmul_(g, g)
            n += 1
    return n
