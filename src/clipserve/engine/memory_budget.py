"""The device memory budget (``memory_budget_gb``, per device) of the model registry.

A :class:`MemoryBudget` counts, per device, what loaded models take (their measured
``memory_bytes``, else their spec's ``memory_gb``) and what loads in progress have reserved
(their spec's estimate); remote models (``openai-vision``, device ``remote``) take nothing, and
``cuda`` is counted as ``cuda:0``.

Contract (the registry's calls, all on the event loop):

* :meth:`MemoryBudget.reserve` runs synchronously before a load's first await, so two loads at
  once cannot both take the last room; it raises :class:`~clipserve.errors.MemoryBudgetError`
  (503, naming each model on the device with its size and requests in flight) or returns the
  close tasks the load must wait for: models being closed that no other load counts on, then,
  with ``evict_idle``, the least recently used idle models (no lease, nothing queued: never one
  with requests in flight), which it asks the registry to retire (``evict``);
* the reservation is released however the load ends (:meth:`MemoryBudget.release`, in the
  load's ``finally``) or replaced by the model's measured size (:meth:`MemoryBudget.loaded`);
* a model counts until its close has run (:meth:`MemoryBudget.closing`, then
  :meth:`MemoryBudget.closed`), so a retired model still serving its last requests counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from clipserve.config import Settings
from clipserve.errors import MemoryBudgetError, MemoryUse
from clipserve.model_specs import ModelSpec

if TYPE_CHECKING:
    from clipserve.engine.registry import ModelHandle

logger = logging.getLogger(__name__)

_GB = 10**9
"""``memory_gb`` and ``memory_budget_gb`` are decimal GB, as the specs' estimates are."""
_REMOTE_DEVICE = "remote"
"""``BackendInfo.device`` of a model served elsewhere (no device memory here)."""

Evict = Callable[[str], None]
"""Retire the named (idle) model to make room."""


@dataclass(frozen=True, slots=True)
class _Reservation:
    """A load's claim on its device's memory budget until the handle's real size replaces it."""

    name: str
    device: str
    nbytes: int
    freeing: tuple[ModelHandle, ...] = ()
    """Closing models whose memory this load counts on (it waits for their closes first); no
    other load may count on them too."""


def _estimate_bytes(spec: ModelSpec) -> int:
    """What the spec says a load will take (0: no estimate, or a remote model)."""
    if spec.backend == "openai-vision" or spec.memory_gb is None:
        return 0
    return int(spec.memory_gb * _GB)


def _handle_bytes(handle: ModelHandle) -> int:
    """What a loaded model takes: its measured size, else the spec's estimate."""
    if handle.device == _REMOTE_DEVICE or handle.spec.backend == "openai-vision":
        return 0
    return handle.info.memory_bytes or _estimate_bytes(handle.spec)


def _budget_device(device: str) -> str:
    """The device a budget is kept for: ``cuda`` (the current device) is ``cuda:0``."""
    return "cuda:0" if device == "cuda" else device


def _queued(handle: ModelHandle) -> int:
    return sum(queue.size for queue in handle.queues.values())


class MemoryBudget:
    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._resident: dict[ModelHandle, None] = {}
        """Every handle whose weights are not released yet (live, retired, closing), in load
        order: what the budget counts."""
        self._closing: dict[ModelHandle, asyncio.Task[None]] = {}
        self._reservations: dict[Hashable, _Reservation] = {}

    def release(self, owner: Hashable) -> None:
        """``owner``'s load ended (any way): its reservation goes."""
        self._reservations.pop(owner, None)

    def closing(self, handle: ModelHandle, task: asyncio.Task[None]) -> None:
        self._closing[handle] = task

    def closed(self, handle: ModelHandle) -> None:
        """Its memory is free now (or abandoned with a stuck device thread)."""
        self._resident.pop(handle, None)
        self._closing.pop(handle, None)

    def _uses(self, device: str) -> list[tuple[MemoryUse, int, ModelHandle | None]]:
        """What takes ``device``'s budget (bytes, and the handle unless a load in progress):
        resident handles in load order, then loads in progress."""
        uses: list[tuple[MemoryUse, int, ModelHandle | None]] = []
        for handle in self._resident:
            nbytes = _handle_bytes(handle)
            if nbytes and _budget_device(handle.device) == device:
                state: Literal["loaded", "unloading"] = "unloading" if handle.retired else "loaded"
                use = MemoryUse(handle.name, nbytes / _GB, handle.leases, _queued(handle), state)
                uses.append((use, nbytes, handle))
        for reserved in self._reservations.values():
            if reserved.nbytes and reserved.device == device:
                use = MemoryUse(reserved.name, reserved.nbytes / _GB, state="loading")
                uses.append((use, reserved.nbytes, None))
        return uses

    def reserve(
        self, owner: Hashable, name: str, spec: ModelSpec, device: str, *, evict: Evict
    ) -> list[asyncio.Task[None]]:
        """Reserve the spec's estimate on ``device`` or raise MemoryBudgetError. When it does not
        fit, closing models nobody counts on yet, then (``evict_idle``) the least recently used
        idle ones, make room: the close tasks the load must wait for are returned."""
        budget_gb, need = self._settings.memory_budget_gb, _estimate_bytes(spec)
        if budget_gb is None or need == 0:
            return []
        key, limit = _budget_device(device), int(budget_gb * _GB)
        uses = self._uses(key)
        taken = sum(nbytes for _, nbytes, _ in uses)
        freeing: list[ModelHandle] = []
        if taken + need > limit and need <= limit:
            claimed = {h for r in self._reservations.values() for h in r.freeing}
            handles = [h for _, _, h in uses if h is not None and h not in claimed]
            closing = [h for h in handles if h in self._closing]
            idle = sorted((h for h in handles if self._idle(h)), key=lambda h: h.last_used)
            freed = 0
            for handle in closing + (idle if self._settings.evict_idle else []):
                if taken - freed + need <= limit:
                    break
                freeing.append(handle)
                freed += _handle_bytes(handle)
            if taken - freed + need <= limit:
                taken -= freed
            else:
                freeing = []  # it would not fit even so: unload nothing
        if taken + need > limit:
            raise self._refusal(name, device, need, limit, taken, [u for u, _, _ in uses])
        self._reservations[owner] = _Reservation(name, key, need, tuple(freeing))
        now = self._clock()
        for handle in freeing:
            if handle.retired:
                continue  # closing already
            logger.info(
                "evicting model '%s' (idle, last used %.0f s ago) to make room for '%s'",
                handle.name,
                now - handle.last_used,
                name,
            )
            evict(handle.name)
        return [self._closing[h] for h in freeing if h in self._closing]

    @staticmethod
    def _idle(handle: ModelHandle) -> bool:
        return not handle.retired and handle.leases == 0 and _queued(handle) == 0

    def _refusal(
        self, name: str, device: str, need: int, limit: int, taken: int, uses: list[MemoryUse]
    ) -> MemoryBudgetError:
        evict = self._settings.evict_idle
        if need > limit:
            hint, soon = "it does not fit even alone; raise memory_budget_gb", False
        elif evict:
            hint = "no idle model can make room; retry when requests finish, or raise the budget"
            soon = True
        else:
            hint = "unload one, raise memory_budget_gb or set evict_idle"
            soon = any(use.state != "loaded" for use in uses)  # a load or close may end soon
        # Retry-After is a hint; a refusal is not held: the next request checks again.
        return MemoryBudgetError(
            name,
            device=device,
            needed_gb=need / _GB,
            budget_gb=limit / _GB,
            left_gb=max(0, limit - taken) / _GB,
            loaded=uses,
            hint=hint,
            retry_after_s=1.0 if soon else self._settings.model_retry_interval_s,
        )

    def loaded(self, owner: Hashable, handle: ModelHandle) -> None:
        """``owner``'s load ended with ``handle``: its measured size replaces the reservation
        at once. Warns when that breaks the budget (the model is kept: it is loaded)."""
        self._resident[handle] = None
        self._reservations.pop(owner, None)
        budget_gb, nbytes = self._settings.memory_budget_gb, _handle_bytes(handle)
        if budget_gb is None or nbytes == 0:
            return
        key, limit = _budget_device(handle.device), int(budget_gb * _GB)
        freeing = {h for r in self._reservations.values() for h in r.freeing}
        taken = sum(nbytes for _, nbytes, h in self._uses(key) if h not in freeing)
        if nbytes > limit:
            logger.warning(
                "model '%s' takes %.2f GB on %s, more than the whole memory budget (%.2f GB); "
                "it stays loaded, other loads there wait until it is unloaded",
                handle.name,
                nbytes / _GB,
                key,
                budget_gb,
            )
        elif taken > limit:
            estimate = handle.spec.memory_gb
            logger.warning(
                "model '%s' takes %.2f GB on %s (%s): the models there now take %.2f GB of the "
                "%.2f GB memory budget",
                handle.name,
                nbytes / _GB,
                key,
                "no memory_gb estimate" if estimate is None else f"estimated {estimate} GB",
                taken / _GB,
                budget_gb,
            )
