"""Exponential moving averages of the fp32 weights, by half-life in images, partitioned over ranks.

The consistency papers evaluate an EMA of the weights (SPEC 12: 0.99993 at batch 128, which is a
half-life of about 1.27 M images; half-lives transfer across batch sizes, decays do not).

Each rank keeps fp32 EMA buffers only for its own contiguous slice of the flattened parameter
vector (a fixed layout: parameters in `named_parameters()` order, split evenly across ranks),
updated locally from the module's fp32 parameters after every applied optimizer step. Under
ZeRO-1/2 with lct's precision presets the module parameters *are* the fp32 master weights (the
module is never cast to bf16, SPEC 1.1) and DeepSpeed all-gathers them after each step, so the
update needs no communication. Full EMAs are gathered only to save, export and sample. The saved
form is the full tensor per parameter, so a checkpoint resumes on any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


def ema_beta(batch_images: int, halflife_images: float) -> float:
    """Per-step decay so that the weight of old images halves every `halflife_images` images."""
    return 0.5 ** (batch_images / halflife_images)


@dataclass
class _Piece:
    param: int        # index into the parameter list
    start: int        # first element of the parameter inside this rank's slice
    stop: int
    offset: int       # position in this rank's flat buffer


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether 1-d contiguous `b` starts where `a` ends, in the same storage and dtype."""
    return (a.dtype == b.dtype and a.device == b.device and a.is_contiguous() and b.is_contiguous()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel())


class PartitionedEMA:
    """Several named EMAs of one module's trainable parameters, each rank holding one slice."""

    def __init__(self, module: torch.nn.Module, halflives: dict[str, float], rank: int = 0,
                 world_size: int = 1):
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = self._params(module)
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        total = sum(self.numels)
        self.rank, self.world_size = rank, world_size
        per_rank = math.ceil(total / world_size)
        self.bounds = [(min(r * per_rank, total), min((r + 1) * per_rank, total)) for r in range(world_size)]
        lo, hi = self.bounds[rank]
        self.pieces: list[_Piece] = []
        pos = 0
        for i, n in enumerate(self.numels):
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                self.pieces.append(_Piece(i, a - pos, b - pos, a - lo))
            pos += n
        self.halflives = dict(halflives)
        device = params[0].device if params else torch.device("cpu")
        self.buffers = {name: torch.empty(hi - lo, dtype=torch.float32, device=device) for name in halflives}
        self._run_key, self._run_cache = None, None
        self.reset(module)

    def _params(self, module: torch.nn.Module) -> list[torch.Tensor]:
        named = dict(module.named_parameters())
        return [named[n] for n in self.names]

    def _slices(self, module: torch.nn.Module) -> list[torch.Tensor]:
        params = self._params(module)
        return [params[p.param].detach().reshape(-1)[p.start:p.stop] for p in self.pieces]

    def _views(self, name: str) -> list[torch.Tensor]:
        buf = self.buffers[name]
        return [buf[p.offset:p.offset + p.stop - p.start] for p in self.pieces]

    def _runs(self, module: torch.nn.Module) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The update's operands, cached: runs of consecutive pieces whose weights lie back to back
        in memory (DeepSpeed ZeRO-1/2 flatten the module's parameters into one buffer, so there the
        whole slice is one run: one lerp kernel per EMA), as each run's weights and each EMA's
        views of the same elements. Rebuilt when a parameter's storage moves (a checkpoint load
        that replaces `p.data`); the check reads the parameters' addresses, nothing on the device."""
        params = self._params(module)
        key = tuple((id(p), p.data_ptr()) for p in params)
        if self._run_key != key:
            runs, srcs = [], []
            for piece, src in zip(self.pieces, self._slices(module)):
                if srcs and _follows(srcs[-1], src):
                    prev = srcs[-1]
                    srcs[-1] = prev.as_strided((prev.numel() + src.numel(),), (1,), prev.storage_offset())
                    runs[-1] = (runs[-1][0], runs[-1][1] + src.numel())
                else:
                    srcs.append(src)
                    runs.append((piece.offset, src.numel()))
            views = {name: [buf[a:a + n] for a, n in runs] for name, buf in self.buffers.items()}
            self._run_key, self._run_cache = key, (srcs, views)
        return self._run_cache

    @torch.no_grad()
    def reset(self, module: torch.nn.Module) -> None:
        """Set every EMA to the module's current weights."""
        src = self._slices(module)
        for name in self.buffers:
            for v, s in zip(self._views(name), src):
                v.copy_(s.float())

    @torch.no_grad()
    def update(self, module: torch.nn.Module, batch_images: int) -> None:
        """One applied optimizer step of `batch_images` images: ema <- lerp(ema, w, 1 - beta), one
        `_foreach_lerp_` per EMA over the cached runs."""
        src, views = self._runs(module)
        src = [s.float() for s in src]
        for name, hl in self.halflives.items():
            if src:
                torch._foreach_lerp_(views[name], src, 1.0 - ema_beta(batch_images, hl))

    @torch.no_grad()
    def full_flat(self, name: str) -> torch.Tensor:
        """The whole flat EMA vector on every rank (all-gather of the slices)."""
        local = self.buffers[name]
        if self.world_size == 1:
            return local.clone()
        per_rank = max(hi - lo for lo, hi in self.bounds)
        padded = torch.zeros(per_rank, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[: hi - lo] for o, (lo, hi) in zip(out, self.bounds)])

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]:
        """Full EMA weights as a state dict of the module's parameter names (collective call)."""
        flat = self.full_flat(name).cpu()
        out, pos = {}, 0
        for n, shape, k in zip(self.names, self.shapes, self.numels):
            out[n] = flat[pos:pos + k].view(shape).clone()
            pos += k
        return out

    @torch.no_grad()
    def load_state_dict_of(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load a full EMA (from any world size) into this rank's slice."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA {name!r} lacks parameters: {missing[:5]}")
        for p, v in zip(self.pieces, self._views(name)):
            v.copy_(state[self.names[p.param]].reshape(-1)[p.start:p.stop].to(v))

    def apply_to(self, module: torch.nn.Module, name: str) -> None:
        """Copy EMA `name` into a module with the same parameter names (collective call)."""
        state = self.state_dict_of(name)
        named = dict(module.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                named[n].copy_(v.to(named[n]))
