"""What an operator may do to on-demand models: list them, load one, unload one.

``ModelAdmin`` answers the admin routes ``GET /admin/models``, ``POST /admin/models/load`` and
``POST /admin/models/unload`` (admin keys only; ``llamaproxy.gateway.resource``) and, through
them, ``llamaproxy models list|load|unload``. A model is named by its backend's name, or by a
model name or alias served by an on-demand backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from twisted.internet.defer import Deferred

from llamaproxy.backends.on_demand import ModelState, OnDemandModel
from llamaproxy.backends.routing import Router


class ModelSet(Protocol):
    """Where the on-demand models are: a ``BackendSet``."""

    models: dict[str, OnDemandModel]
    router: Router | None


class UnknownOnDemandModelError(LookupError):
    """No on-demand backend has this name or serves this model."""


class ModelAdmin:
    """Lists, loads and unloads the on-demand models of a ``BackendSet``."""

    def __init__(self, backends: ModelSet, default_grace: float = 30.0) -> None:
        self.backends = backends
        #: Drain bound of an unload for a model without a group (DRAIN_TIMEOUT).
        self.default_grace = default_grace

    def find(self, name: str) -> OnDemandModel:
        """The on-demand model called ``name`` (backend, model or alias name)."""
        models: Mapping[str, OnDemandModel] = self.backends.models
        if name in models:
            return models[name]
        router = self.backends.router
        canonical = router.table.lookup(name) if router is not None else None
        if router is not None and canonical is not None:
            for spec in router.table.backends_for(canonical):
                if spec.name in models:
                    return models[spec.name]
        raise UnknownOnDemandModelError(name)

    def list(self) -> list[dict[str, object]]:
        """Every on-demand model: backend, models, state, group, idle_ttl, in flight."""
        router = self.backends.router
        documents = []
        for name, model in self.backends.models.items():
            member = router.members.get(name) if router is not None else None
            doc: dict[str, object] = {
                "backend": name,
                "models": list(member.spec.models) if member is not None else [],
                **model.status_json(),
                "in_flight": model.load.active,
                "queued": model.load.waiting,
            }
            documents.append(doc)
        return documents

    def load(self, name: str) -> dict[str, object]:
        """Start the model (through its group: a swap may be needed); its state now."""
        model = self.find(name)
        if model.state not in (ModelState.READY, ModelState.LOADING):
            if model.group is not None:
                model.group.want(model, reason="operator")
            else:
                model.start("operator")
        return {"backend": model.backend_name, **model.status_json()}

    def unload(self, name: str) -> Deferred[dict[str, object]]:
        """Drain, then stop the model; fires with its state once stopped."""
        model = self.find(name)
        grace = model.group.spec.swap_grace if model.group is not None else self.default_grace
        if model.group is not None:
            model.group.forget(model)
        done = model.unload("operator", grace)
        return done.addCallback(lambda _: {"backend": model.backend_name, **model.status_json()})
