"""The GPU code path (device selection, autocast bf16/fp16, channels_last, batching) checked on
the CPU: same probabilities and Grad-CAM maps as plain fp32 within tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from bench.studies import StudyFactory
from node.analysis.classify import Classifier, resolve_device, resolve_precision
from node.analysis.pipeline import AnalysisPipeline
from node.analysis.result import ImageInput
from node.config import ConfigError, ModelSettings, parse_settings

SHIPPED = Path(__file__).resolve().parents[1] / "models/weights/calc-cluster-lite0.json"
CPU = ModelSettings(card=SHIPPED, device="cpu")


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    size = Classifier(SHIPPED, network=True, device="cpu").card.input_size
    out = []
    for _ in range(12):  # grey background with a few bright specks, like a real ROI
        img = 0.4 + 0.05 * rng.standard_normal((size, size)).astype(np.float32)
        for r, c in rng.integers(10, size - 10, size=(5, 2)):
            img[r - 2 : r + 2, c - 2 : c + 2] += 0.4
        out.append(np.clip(img, 0, 1))
    return out


def test_precision_and_device_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") is None  # bf16 is emulated on CPUs: fp32
    assert resolve_precision(cpu, "fp32") is None
    assert resolve_precision(cpu, "bf16") is torch.bfloat16
    assert resolve_precision(cpu, "fp16") is torch.float16
    cuda = torch.device("cuda")
    assert resolve_precision(cuda, "auto") in (torch.bfloat16, torch.float16)
    assert resolve_precision(cuda, "fp32") is None
    with pytest.raises(RuntimeError, match="model.precision"):
        resolve_precision(cpu, "int8")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(RuntimeError, match="not supported"):
        resolve_device("mps")


def test_config_precision_key(tmp_path: Path) -> None:
    assert parse_settings({}, tmp_path).model.precision == "auto"
    assert parse_settings({"model": {"precision": "bf16"}}, tmp_path).model.precision == "bf16"
    with pytest.raises(ConfigError, match="model.precision"):
        parse_settings({"model": {"precision": "half"}}, tmp_path)


def test_channels_last_and_batching_match_batch_one(crops: list[np.ndarray]) -> None:
    one = Classifier(SHIPPED, network=True, device="cpu", batch_size=1, precision="fp32")
    many = Classifier(SHIPPED, network=True, device="cpu", batch_size=8, precision="fp32")
    assert one.amp_dtype is None
    stem = many.model.conv_stem.weight
    assert stem.is_contiguous(memory_format=torch.channels_last)
    assert many._tensor(crops[:3]).is_contiguous(memory_format=torch.channels_last)
    p1, cams1, _ = one.predict(crops, with_cam=True)
    p8, cams8, _ = many.predict(crops, with_cam=True)  # 8 + 4: a full and a partial batch
    assert p1.shape == p8.shape == (len(crops),)
    np.testing.assert_allclose(p8, p1, atol=1e-4)
    for a, b in zip(cams1, cams8, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-3)
    p_nocam, _, _ = many.predict(crops, with_cam=False)
    np.testing.assert_allclose(p_nocam, p1, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_matches_fp32(crops: list[np.ndarray], precision: str) -> None:
    ref = Classifier(SHIPPED, network=True, device="cpu", batch_size=16, precision="fp32")
    amp = Classifier(SHIPPED, network=True, device="cpu", batch_size=16, precision=precision)
    assert amp.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    p_ref, cams_ref, _ = ref.predict(crops, with_cam=True)
    p_amp, cams_amp, _ = amp.predict(crops, with_cam=True)
    assert p_amp.dtype == np.float64 and np.isfinite(p_amp).all()
    np.testing.assert_allclose(p_amp, p_ref, atol=0.03)
    corr = []
    for a, b in zip(cams_ref, cams_amp, strict=True):
        assert b.dtype == np.float32 and b.shape == a.shape
        assert b.min() >= 0.0 and b.max() <= 1.0
        if a.max() > 0 and b.max() > 0:
            corr.append(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    # 4 x 4 maps with an 8-bit (bf16) mantissa: close on average, never unrelated
    assert len(corr) >= len(crops) // 2 and np.mean(corr) > 0.9 and min(corr) > 0.6, corr


def test_parallel_prepare_gives_the_serial_result(tmp_path: Path) -> None:
    files = StudyFactory("tiny", tag="gpu-path").write_study(0, tmp_path)
    inputs = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        inputs.append(ImageInput(f, str(ds.SOPInstanceUID), str(ds.SOPClassUID)))
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    serial = AnalysisPipeline(CPU, max_workers=1).analyse(study, inputs)
    parallel = AnalysisPipeline(CPU, max_workers=4).analyse(study, inputs)
    assert [i.sop_instance_uid for i in parallel.images] == [i.sop_instance_uid for i in inputs]
    assert len(parallel.findings) == len(serial.findings) > 0
    for a, b in zip(serial.findings, parallel.findings, strict=True):
        assert (a.sop_instance_uid, a.centre_xy, a.index) == (b.sop_instance_uid, b.centre_xy,
                                                              b.index)
        assert b.probability == pytest.approx(a.probability, abs=1e-5)
    for a, b in zip(serial.images, parallel.images, strict=True):
        np.testing.assert_allclose(b.cam, a.cam, atol=1e-4)
    t = parallel.timings_ms
    assert {"decode", "rois", "classify", "gradcam", "total"} <= set(t)
    assert t["decode"] + t["rois"] <= t["total"] + 1.0
