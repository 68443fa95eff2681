"""The models a running node serves: the active one and the shadow one, switched live.

The roles live in the database (node.modelstore). A running node reads them every
:data:`MODEL_POLL_SECONDS` (a scheduler job) and, when they changed, loads the new model and
switches to it; no restart, and nothing queued is touched:

* the worker analyses through :class:`SwitchableAnalyser`. An analysis runs entirely on the
  model that was active when it *started*, and its ``StudyAnalysis.model`` names that model, so
  the worker's analysis key, the result UIDs and the SR's algorithm name/version are those of
  the model that actually ran. A job running at the switch finishes on the previous model;
  every job that starts after it (queued ones included) runs on the new one. Jobs are neither
  re-queued nor dropped, and studies already analysed are not analysed again.
* a model that cannot be loaded (files gone on this machine, damaged) is not switched to: the
  current model keeps serving, the error is logged and shown on the status page, and the load
  is tried again every :data:`RETRY_FAILED_LOAD_SECONDS` (a repaired install is picked up). At
  start-up an activated model that cannot be loaded stops the node with the reason (as a bad
  ``[model] card`` does).
* the shadow model is loaded beside the active one (its own network: the two never share a
  model object between threads); a shadow model that fails to load only disables shadow mode.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.card import ModelCard
from node.analysis.result import ImageInput, ModelInfo, StudyAnalyser, StudyAnalysis
from node.config import Settings
from node.db import Database
from node.log import event
from node.modelstore import ModelRef, ModelStore, headline_metrics

log = logging.getLogger("node.models")

MODEL_POLL_SECONDS = 2.0
RETRY_FAILED_LOAD_SECONDS = 60.0  # a model that failed to load is tried again after this
Loader = Callable[[Settings], StudyAnalyser]


@dataclass(frozen=True)
class LoadedModel:
    ref: ModelRef
    source: str  # "installed" (data_dir/models) or "config" ([model] card)
    analyser: StudyAnalyser
    loaded_at: dt.datetime
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # the card's headline
    intended_use: str = ""

    @property
    def info(self) -> ModelInfo:
        return self.analyser.model


class SwitchableAnalyser:
    """What the worker calls: each analysis uses the model active when it started."""

    def __init__(self, analyser: StudyAnalyser) -> None:
        self._analyser = analyser

    @property
    def model(self) -> ModelInfo:
        return self._analyser.model

    @property
    def current(self) -> StudyAnalyser:
        return self._analyser

    def analyse(self, study_instance_uid: str, images: list[ImageInput],
                **kwargs: Any) -> StudyAnalysis:
        analyser = self._analyser  # one read: a switch during the analysis does not affect it
        return analyser.analyse(study_instance_uid, images, **kwargs)

    def switch(self, analyser: StudyAnalyser) -> None:
        self._analyser = analyser

    def __getattr__(self, name: str) -> Any:  # e.g. .classifier of the pipeline
        return getattr(self._analyser, name)


class ModelManager:
    """Loads the active and shadow models from the roles and keeps them current."""

    def __init__(self, settings: Settings, db: Database, loader: Loader,
                 default: StudyAnalyser | None = None) -> None:
        self.settings = settings
        self.store = ModelStore(db, settings.node.data_dir)
        self.loader = loader
        self._default = default
        self._default_given = default is not None  # else loaded from [model] card when needed
        self._lock = threading.Lock()
        self.active_error: str | None = None
        self.shadow_error: str | None = None
        self._failed: dict[str, tuple[ModelRef | None, float]] = {}  # role -> (ref, when)
        roles = self.store.roles()
        wanted = roles.get("active")
        if wanted is None:
            self.active = self._load_default()
        else:
            try:
                self.active = self._load_installed(wanted)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"the active model {wanted} cannot be loaded: {exc}. Install it again, or "
                    "serve [model] card with: mammo-node model activate --default") from None
        self.analyser = SwitchableAnalyser(self.active.analyser)
        self.shadow: LoadedModel | None = None
        if "shadow" in roles:
            self._switch_shadow(roles["shadow"])

    # -- loading -------------------------------------------------------------------------------
    def default_ref(self) -> ModelRef:
        if self._default is not None:
            return ModelRef(self._default.model.name, self._default.model.version)
        try:
            card = ModelCard.load(self.settings.model.card)
        except ValueError:
            return ModelRef("?", "?")
        return ModelRef(card.name, card.version)

    def _load_default(self) -> LoadedModel:
        if self._default is None:
            self._default = self.loader(self.settings)
        info = self._default.model
        metrics: dict[str, Any] = {}
        intended = ""
        try:
            card = ModelCard.load(self.settings.model.card)
            if (card.name, card.version) == (info.name, info.version):
                metrics, intended = headline_metrics(card), card.intended_use
        except ValueError:
            pass
        return LoadedModel(ModelRef(info.name, info.version), "config", self._default,
                           dt.datetime.now(dt.UTC), metrics, intended)

    def _load_installed(self, ref: ModelRef) -> LoadedModel:
        row = self.store.get(ref)
        if row is None:
            raise RuntimeError(f"{ref} is not installed in {self.store.root}")
        problems = self.store.check_files(row)
        if problems:
            raise RuntimeError("; ".join(problems))
        # The installed card names its own architecture and threshold ([model] architecture and
        # threshold describe the [model] card default); device, batch size, precision and the
        # [analysis] settings apply to every model.
        model = dataclasses.replace(self.settings.model, card=self.store.card_path(row),
                                    architecture=row.architecture, threshold="card")
        analyser = self.loader(dataclasses.replace(self.settings, model=model))
        return LoadedModel(ref, "installed", analyser, dt.datetime.now(dt.UTC),
                           json.loads(row.metrics or "{}"), row.intended_use)

    # -- keeping current -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Follow the roles in the database (a scheduler job; never raises for a bad model)."""
        with self._lock:
            roles = self.store.roles()
            self._switch_active(roles.get("active"))
            wanted = roles.get("shadow")
            if wanted is None:
                if self.shadow is not None:
                    event(log, "shadow.disabled", model=self.shadow.ref.name,
                          model_version=self.shadow.ref.version)
                self.shadow, self.shadow_error = None, None
                self._failed.pop("shadow", None)
            elif self.shadow is None or self.shadow.ref != wanted:
                self._switch_shadow(wanted)

    def _switch_active(self, wanted: ModelRef | None) -> None:
        current = self.active
        if wanted is None and current.source == "config":
            self.active_error = None
            return
        if wanted is not None and current.source == "installed" and current.ref == wanted:
            self.active_error = None
            return
        if self._recently_failed("active", wanted):
            return
        try:
            new = self._load_default() if wanted is None else self._load_installed(wanted)
        except Exception as exc:  # noqa: BLE001 - a model that does not load is not served
            self._failed["active"] = (wanted, time.monotonic())
            self.active_error = f"{wanted or 'the [model] card default'} not loaded: {exc}"
            event(log, "model.load_failed", logging.ERROR, role="active",
                  model=wanted.name if wanted else "default", error=str(exc)[:300],
                  serving=f"{current.ref}")
            self.store.record("load_failed", wanted, f"active: {exc}")
            return
        self._failed.pop("active", None)
        self.active_error = None
        self.analyser.switch(new.analyser)
        self.active = new
        if new.source == "installed" and not self._default_given:
            self._default = None  # not kept in memory while an installed model serves
        event(log, "model.activated", model=new.ref.name, model_version=new.ref.version,
              source=new.source, previous=f"{current.ref}",
              queued_jobs="run on the new model; a running analysis finishes on the previous")
        self.store.record("loaded", new.ref, f"active ({new.source})")

    def _recently_failed(self, role: str, wanted: ModelRef | None) -> bool:
        """The same model failed to load less than RETRY_FAILED_LOAD_SECONDS ago (a repaired
        install, `mammo-node model install` of the same card again, is picked up after that)."""
        failed = self._failed.get(role)
        return (failed is not None and failed[0] == wanted
                and time.monotonic() - failed[1] < RETRY_FAILED_LOAD_SECONDS)

    def _switch_shadow(self, wanted: ModelRef) -> None:
        if self._recently_failed("shadow", wanted):
            return
        try:
            new = self._load_installed(wanted)
        except Exception as exc:  # noqa: BLE001 - a shadow failure never touches the active
            self._failed["shadow"] = (wanted, time.monotonic())
            self.shadow, self.shadow_error = None, f"{wanted} not loaded: {exc}"
            event(log, "model.load_failed", logging.ERROR, role="shadow", model=wanted.name,
                  model_version=wanted.version, error=str(exc)[:300])
            self.store.record("load_failed", wanted, f"shadow: {exc}")
            return
        self._failed.pop("shadow", None)
        self.shadow, self.shadow_error = new, None
        event(log, "shadow.enabled", model=wanted.name, model_version=wanted.version)
        self.store.record("loaded", wanted, "shadow")

    def describe(self) -> dict[str, Any]:
        """What this node serves now (for the status page)."""
        def one(m: LoadedModel | None) -> dict[str, Any] | None:
            if m is None:
                return None
            return {"name": m.ref.name, "version": m.ref.version, "source": m.source,
                    "architecture": m.info.architecture, "threshold": m.info.threshold,
                    "loaded_at": m.loaded_at.replace(tzinfo=None), "metrics": m.metrics,
                    "intended_use": m.intended_use}

        return {"active": one(self.active), "active_error": self.active_error,
                "shadow": one(self.shadow), "shadow_error": self.shadow_error}
