"""Model lifecycle in process: install (the card contract, immutable versions), activation
while work is queued (each result keyed on the model that ran), shadow mode (stored, never
delivered; a failing shadow model touches nothing else), compare."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from models.card import ModelCard
from node.analysis.pipeline import AnalysisPipeline
from node.config import ModelSettings
from node.db import (
    Delivery,
    Job,
    ModelEvent,
    Result,
    ResultObject,
    ScoredBreast,
    ScoredFinding,
    ShadowRun,
    Study,
)
from node.evaluation import compare, render_compare
from node.modelstore import ModelRef, ModelStoreError
from tests.lifecycle import make_env, manager, store_files, worker
from tests.modelfixtures import SHIPPED_CARD, variant_card
from tests.smallstudies import small_study

LOW = ModelRef("calc-cluster-lite0-low", "0.2.0")
SHIPPED = ModelRef("calc-cluster-lite0", ModelCard.load(SHIPPED_CARD).version)


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cards")
    return {"low": variant_card(d, LOW.name, LOW.version, logit_shift=-1.5),
            "low2": variant_card(d, LOW.name, "0.3.0", logit_shift=-1.0)}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[Path]]:
    """Small studies: 1 and 3 have findings, 0 has none."""
    d = tmp_path_factory.mktemp("studies")
    return {i: small_study(d / str(i), i, tag="life") for i in (0, 1, 3)}


@pytest.fixture(scope="module")
def shipped() -> AnalysisPipeline:
    return AnalysisPipeline(ModelSettings(card=SHIPPED_CARD, device="cpu"))


def _key(input_key: str, model: dict, threshold: float) -> str:
    text = "|".join([input_key, model["name"], model["version"], "tf_efficientnet_lite0",
                     f"{threshold:.6f}"])
    return hashlib.sha256(text.encode()).hexdigest()


def _texts(ds: pydicom.Dataset) -> set[str]:
    out = set()
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.add(str(item.TextValue))
        out |= _texts(item)
    return out


# -- install -------------------------------------------------------------------------------------
def test_install_verifies_and_keeps_immutable_versions(tmp_path: Path, cards: dict) -> None:
    env = make_env(tmp_path)
    r = env.store.install(cards["low"])
    assert not r.already_installed and "roi_kinds" in " ".join(r.warnings)
    folder = env.data_dir / "models" / LOW.name / LOW.version
    # the card, its weights and the cluster detector it names, nothing else
    assert sorted(p.name for p in folder.iterdir()) == ["calc-cluster-lite0-low-0.2.0"
                                                        ".safetensors", "calc-detector.json",
                                                        "card.json"]
    assert (folder / "card.json").read_bytes() == cards["low"].read_bytes()
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o400
    assert stat.S_IMODE(folder.stat().st_mode) == 0o500
    # the same card again: nothing changes
    again = env.store.install(cards["low"])
    assert again.already_installed and again.model.id == r.model.id
    # the same name:version with other weights is refused: versions never change
    other = variant_card(tmp_path / "other", LOW.name, LOW.version, logit_shift=2.0)
    with pytest.raises(ModelStoreError, match="already installed with other weights"):
        env.store.install(other)
    # another version is another install; NAME alone means the latest
    env.store.install(cards["low2"])
    assert env.store.resolve(LOW.name).version == "0.3.0"
    assert env.store.resolve(f"{LOW.name}:0.2.0").version == "0.2.0"
    with pytest.raises(ModelStoreError, match="not installed"):
        env.store.resolve("nope:1")
    # refusals by the card contract and the folder-name rule, each with the reason
    bad = variant_card(tmp_path / "bad", "no-use", "1", logit_shift=0, intended_use="")
    with pytest.raises(ModelStoreError, match="intended_use is empty"):
        env.store.install(bad)
    tampered = variant_card(tmp_path / "t", "tampered", "1", logit_shift=0.5)
    w = tampered.with_suffix(".safetensors")
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelStoreError, match="does not match the card's weights_sha256"):
        env.store.install(tampered)
    raw = json.loads(cards["low"].read_text())
    (tmp_path / "u").mkdir()
    shutil.copyfile(cards["low"].with_suffix(".safetensors"), tmp_path / "u" / raw[
        "weights_file"])
    shutil.copyfile(cards["low"].parent / raw["detector_file"], tmp_path / "u" / raw[
        "detector_file"])
    (tmp_path / "u" / "card.json").write_text(json.dumps({**raw, "version": "../1"}))
    with pytest.raises(ModelStoreError, match="version '../1' cannot name a folder"):
        env.store.install(tmp_path / "u" / "card.json", load=False)
    assert [(m.name, m.version) for m in env.store.installed()] == [
        (LOW.name, "0.2.0"), (LOW.name, "0.3.0")]
    assert not list((env.data_dir / "models").glob(".incoming-*"))


def test_roles_and_a_damaged_install(tmp_path: Path, cards: dict) -> None:
    env = make_env(tmp_path)
    env.store.install(cards["low"], load=False)
    env.store.install(cards["low2"], load=False)
    with pytest.raises(ModelStoreError, match="is the active model"):
        env.store.set_shadow(str(LOW), active=LOW)
    env.store.set_shadow(str(LOW), active=SHIPPED)
    model, notes = env.store.activate(str(LOW), default=SHIPPED)
    assert notes == [f"{LOW} was the shadow model: shadow mode is now off"]
    assert env.store.roles() == {"active": LOW}
    assert env.store.activate_default() == LOW and env.store.roles() == {}
    # a damaged copy is never served
    weights = env.data_dir / model.relpath / model.weights_file
    os.chmod(weights, 0o600)
    weights.write_bytes(b"x" + weights.read_bytes()[1:])
    with pytest.raises(ModelStoreError, match="does not match its recorded sha256"):
        env.store.activate(str(LOW))
    # installing the same card again repairs the copy
    again = env.store.install(cards["low"], load=False)
    assert again.already_installed and "repaired" in again.warnings[-1]
    assert env.store.check_files(again.model) == []
    env.store.activate(str(LOW))
    with env.db.session() as s:
        actions = [e.action for e in s.execute(select(ModelEvent).order_by(ModelEvent.id))
                   .scalars()]
    assert actions == ["install", "install", "shadow", "activate", "default", "repair",
                       "activate"]


def test_start_refuses_an_active_model_it_cannot_load(tmp_path: Path, cards: dict) -> None:
    env = make_env(tmp_path)
    model = env.store.install(cards["low"], load=False).model
    env.store.activate(str(LOW))
    weights = env.data_dir / model.relpath / model.weights_file
    os.chmod(weights.parent, 0o700)
    weights.unlink()
    with pytest.raises(RuntimeError, match="active model .* cannot be loaded: .* is missing.*"
                                           "model activate --default"):
        manager(env)


# -- activation with queued work -----------------------------------------------------------------
class SwitchDuring:
    """The shipped pipeline, calling ``during`` once inside its first analysis."""

    def __init__(self, pipeline: AnalysisPipeline) -> None:
        self.pipeline, self.model, self.during = pipeline, pipeline.model, None

    def analyse(self, study_uid, images, **kw):  # type: ignore[no-untyped-def]
        if self.during is not None:
            during, self.during = self.during, None
            during()
        return self.pipeline.analyse(study_uid, images, **kw)


def test_activation_keeps_queued_work_and_keys_follow_the_model_that_ran(
        tmp_path: Path, cards: dict, studies: dict, shipped: AnalysisPipeline) -> None:
    env = make_env(tmp_path)
    env.store.install(cards["low"], load=False)
    default = SwitchDuring(shipped)
    models = manager(env, default=default)
    w, _ = worker(env, models)
    uids = [store_files(env, studies[i]) for i in (1, 3, 0)]  # three jobs queued

    def activate_now() -> None:  # while job 1 is being analysed
        env.store.activate(str(LOW))
        models.refresh()
        assert models.active.ref == LOW

    default.during = activate_now
    assert w.run_once() and w.run_once() and w.run_once() and not w.run_once()
    with env.db.session() as s:
        jobs = s.execute(select(Job).order_by(Job.id)).scalars().all()
        results = s.execute(select(Result).order_by(Result.id)).scalars().all()
        deliveries = s.execute(select(Delivery)).scalars().all()
        srs = {r.study_id: s.execute(select(ResultObject.relpath).where(
            ResultObject.result_id == r.id, ResultObject.sop_class_uid.like("%.88.33"))
        ).scalar() for r in results}
    # nothing lost, nothing twice: three jobs done, one result and one delivery each
    assert [j.state for j in jobs] == ["done"] * 3
    assert len(results) == 3 and {r.job_id for r in results} == {j.id for j in jobs}
    assert len(deliveries) == 3
    # the job running at the switch finished on the previous model; the queued ones on LOW
    ran = [json.loads(r.summary)["model"] for r in results]
    assert ran == [{"name": SHIPPED.name, "version": SHIPPED.version},
                   {"name": LOW.name, "version": LOW.version},
                   {"name": LOW.name, "version": LOW.version}]
    thresholds = [shipped.model.threshold, models.active.info.threshold,
                  models.active.info.threshold]
    for r, j, m, t in zip(results, jobs, ran, thresholds, strict=True):
        assert r.analysis_key == _key(j.input_key, m, t)
    # the SR names the model that ran
    sr_texts = [_texts(pydicom.dcmread(env.spool.path(srs[r.study_id]))) for r in results]
    assert SHIPPED.name in " ".join(sr_texts[0])
    assert LOW.name in " ".join(sr_texts[1]) and LOW.name not in " ".join(sr_texts[0])
    # determinism: the same inputs on the same model give the same key, so no second result
    with env.db.session() as s:
        s.get(Job, jobs[1].id).state = "queued"
    assert w.run_once()
    with env.db.session() as s:
        assert s.execute(select(func.count()).select_from(Result)).scalar() == 3
        assert s.execute(select(func.count()).select_from(Delivery)).scalar() == 3
    # the live metrics record each breast under the model that scored it
    with env.db.session() as s:
        scored = {(b.study_uid, b.model_name) for b in s.execute(select(ScoredBreast)).scalars()}
    assert {(uids[0], SHIPPED.name), (uids[1], LOW.name), (uids[2], LOW.name)} <= scored
    # back to [model] card
    env.store.activate_default()
    models.refresh()
    assert models.active.source == "config" and models.analyser.model.name == SHIPPED.name


# -- shadow mode ----------------------------------------------------------------------------------
class Broken:
    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        self.model = model
        self.calls = 0

    def analyse(self, *a, **kw):  # type: ignore[no-untyped-def]
        self.calls += 1
        raise RuntimeError("shadow model exploded")


def test_shadow_results_are_stored_never_delivered_and_failures_stay_alone(
        tmp_path: Path, cards: dict, studies: dict, shipped: AnalysisPipeline) -> None:
    env = make_env(tmp_path)
    env.store.install(cards["low"], load=False)
    env.store.set_shadow(str(LOW), active=SHIPPED)
    models = manager(env, default=shipped)
    assert models.shadow is not None and models.shadow.ref == LOW
    w, shadow = worker(env, models)
    s1 = store_files(env, studies[1])
    assert not shadow.run_once()  # nothing queued yet; and the active job waits for nobody
    assert w.run_once()
    with env.db.session() as s:
        objects_before = s.execute(select(func.count()).select_from(ResultObject)).scalar()
        run = s.execute(select(ShadowRun)).scalar_one()
    assert (run.state, run.model_name, run.active_name) == ("queued", LOW.name, SHIPPED.name)
    # the shadow waits while the analysis queue has work
    s3 = store_files(env, studies[3])
    assert shadow.active_busy() and not shadow.run_once()
    assert w.run_once() and not shadow.active_busy()
    assert shadow.run_once() and shadow.run_once() and not shadow.run_once()
    with env.db.session() as s:
        runs = s.execute(select(ShadowRun).order_by(ShadowRun.id)).scalars().all()
        deliveries = s.execute(select(Delivery)).scalars().all()
        objects = s.execute(select(func.count()).select_from(ResultObject)).scalar()
        results = s.execute(select(Result)).scalars().all()
        findings = s.execute(select(ScoredFinding).where(ScoredFinding.study_uid == s1)
                             ).scalars().all()
    assert [r.state for r in runs] == ["done", "done"]
    # nothing of the shadow model is delivered or becomes a result object
    assert len(results) == 2 and len(deliveries) == 2 and objects == objects_before * 2
    assert {json.loads(r.summary)["model"]["name"] for r in results} == {SHIPPED.name}
    doc = json.loads(env.spool.path(runs[0].relpath).read_text())
    assert doc["shadow"] is True and doc["delivered"] is False
    assert doc["model"]["name"] == LOW.name and doc["study_instance_uid"] == s1
    assert runs[0].relpath.startswith("shadow/")
    assert stat.S_IMODE(env.spool.path(runs[0].relpath).stat().st_mode) & 0o077 == 0
    # both models scored the same findings; the shadow's are lower (its logit is shifted)
    by_model: dict[str, dict[int, float]] = {}
    for f in findings:
        by_model.setdefault(f.model_name, {})[f.finding_index] = f.probability
    assert set(by_model[SHIPPED.name]) == set(by_model[LOW.name]) and by_model[LOW.name]
    assert all(by_model[LOW.name][i] < by_model[SHIPPED.name][i] for i in by_model[LOW.name])
    assert len(doc["findings"]) == len(by_model[LOW.name])
    # compare: what it reports follows from the stored probabilities and thresholds
    r = compare(env.db, SHIPPED, LOW)
    assert r["studies"] == 2 and r["breasts"] == 4
    ta, ts = shipped.model.threshold, models.shadow.info.threshold
    with env.db.session() as s:
        all_f = s.execute(select(ScoredFinding)).scalars().all()
    pa = {(f.study_uid, f.finding_index): f.probability >= ta for f in all_f
          if f.model_name == SHIPPED.name}
    ps = {(f.study_uid, f.finding_index): f.probability >= ts for f in all_f
          if f.model_name == LOW.name}
    assert r["per_finding"]["pairs"] == len(pa) == len(ps)
    assert r["per_finding"]["both_malignant"] == sum(pa[k] and ps[k] for k in pa)
    assert r["per_finding"]["active_only_malignant"] == sum(pa[k] and not ps[k] for k in pa)
    assert r["per_finding"]["agreement"] == pytest.approx(np.mean([pa[k] == ps[k] for k in pa]))
    assert r["distribution"]["finding_probability"]["shadow"]["n"] == len(ps)
    later = compare(env.db, SHIPPED, LOW, since=dt.datetime.now() + dt.timedelta(days=1))
    assert later["breasts"] == 0 and "nothing to compare yet" in render_compare(later)
    assert "agreement per breast" in render_compare(r)

    # a shadow model that raises fails its run only (retried once), never the active result
    broken = Broken(models.shadow.info)
    import dataclasses

    models.shadow = dataclasses.replace(models.shadow, analyser=broken)
    s0 = store_files(env, studies[0])
    assert w.run_once()
    assert shadow.run_once() and shadow.run_once() and not shadow.run_once()
    with env.db.session() as s:
        last = s.execute(select(ShadowRun).order_by(ShadowRun.id.desc())).scalars().first()
        job = s.execute(select(Job).order_by(Job.id.desc())).scalars().first()
        n_deliveries = s.execute(select(func.count()).select_from(Delivery)).scalar()
    assert broken.calls == 2 and last.state == "failed" and "exploded" in last.error
    assert last.study_uid == s0 and job.state == "done" and n_deliveries == 3
    assert s3 != s0

    # a shadow model whose files are damaged only disables shadow mode
    model = env.store.get(LOW)
    env.store.set_shadow(str(LOW), active=SHIPPED)
    weights = env.data_dir / model.relpath / model.weights_file
    os.chmod(weights, 0o600)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    models.shadow = None
    models.refresh()
    assert models.shadow is None and "does not match" in models.shadow_error
    assert models.active.ref == SHIPPED and models.active_error is None
    env.store.shadow_off()
    models.refresh()
    assert models.shadow_error is None


def test_shadow_run_of_a_changed_study_is_dropped(tmp_path: Path, cards: dict, studies: dict,
                                                  shipped: AnalysisPipeline) -> None:
    env = make_env(tmp_path)
    env.store.install(cards["low"], load=False)
    env.store.set_shadow(str(LOW), active=SHIPPED)
    models = manager(env, default=shipped)
    w, shadow = worker(env, models)
    store_files(env, studies[0])
    assert w.run_once()
    # a study being received holds the shadow model back until it has been quiet a while
    with env.db.session() as s:
        s.add(Study(study_uid="1.2.3.4.5", state="receiving"))
    assert shadow.active_busy() and not shadow.run_once()
    with env.db.session() as s:
        s.execute(Study.__table__.update().where(Study.study_uid == "1.2.3.4.5")
                  .values(last_received_at=dt.datetime(2000, 1, 1)))
    assert not shadow.active_busy()
    with env.db.session() as s:
        s.execute(Job.__table__.update().values(input_key="changed"))
    assert shadow.run_once()
    with env.db.session() as s:
        run = s.execute(select(ShadowRun)).scalar_one()
    assert run.state == "dropped" and "changed" in run.error
    # a restart re-queues a run that was running
    with env.db.session() as s:
        s.get(ShadowRun, run.id).state = "running"
    assert shadow.recover() == 1
    # runs of studies that retention purged go, with their JSON
    stray = env.spool.path("shadow/2026/01/01/x.json")
    stray.parent.mkdir(parents=True)
    stray.write_text("{}")
    os.utime(stray, (0, 0))
    with env.db.session() as s:
        s.get(ShadowRun, run.id).relpath = "shadow/2026/01/01/y.json"
    env.spool.path("shadow/2026/01/01/y.json").write_text("{}")
    assert shadow.purge_orphans() == 0  # its study is still there
    assert not stray.exists()  # a JSON no run references (a crash before recording)
    from node.retention import purge_expired

    with env.db.session() as s:
        s.execute(Study.__table__.update().values(last_received_at=dt.datetime(2000, 1, 1)))
        s.execute(Delivery.__table__.update().values(state="done"))
    assert purge_expired(env.db, env.spool, 30) == 1
    assert shadow.purge_orphans() == 1
    assert not env.spool.path("shadow/2026/01/01/y.json").exists()
