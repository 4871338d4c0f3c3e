"""Encoder backends against the real model: each keeps float32's vectors and truncation; ONNX and OpenVINO
exports are cached, checked and rebuilt; "auto" measures, chooses, remembers; what cannot run says why."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import calibration

from pgsim.demo.corpus import Package
from pgsim.encoding.backends import base as backends
from pgsim.encoding.backends import lanes, measure
from pgsim.encoding.backends.auto import build, choose
from pgsim.encoding.backends.base import BACKENDS, BackendUnavailable
from pgsim.encoding.backends.exported import EXPORT_FORMAT
from pgsim.encoding.backends.torch import TorchBackend
from pgsim.encoding.encoder import Encoder
from pgsim.encoding.models import load_model, model_revision
from pgsim.errors import InvalidInput

MODEL = "all-MiniLM-L6-v2"

# A test marked so starts with the session's exports in its cache: exporting takes seconds, and the tests that
# are about exporting (cached, damaged, failing, unwritable) start from an empty cache.
warm_exports = pytest.mark.warm_exports


@pytest.fixture(scope="session")
def session_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("exports")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGSIM_CACHE_DIR", str(directory))
        for name in EXPORTS:
            build(name, load_model(MODEL), MODEL, model_revision(MODEL))
    return directory


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """Exports and choices in a directory of this test's own."""
    directory = tmp_path / "cache"
    if request.node.get_closest_marker("warm_exports"):
        for name in EXPORTS:
            shutil.copytree(request.getfixturevalue("session_exports") / name, directory / name)
    monkeypatch.setenv("PGSIM_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(scope="module")
def float32_reference(
    packages: list[Package], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], str, list[Any], int]:
    """20 texts, one past the 256-token limit, float32's vectors for them and how many it counted as cut:
    what every backend is compared with, encoded once for all of them."""
    texts = [p.text for p in packages[:20]]
    long_text = " ".join(p.text for p in packages[:60])  # thousands of words: past the 256-token limit
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGSIM_CACHE_DIR", str(tmp_path_factory.mktemp("float32")))
        float32 = Encoder(MODEL, backend="torch", warn_truncation=False)
        reference = float32.encode([*texts, long_text])
    return texts, long_text, reference, float32.stats.truncated


@warm_exports
@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_keeps_float32_vectors_and_truncation(
    name: str, float32_reference: tuple[list[str], str, list[Any], int]
) -> None:
    texts, long_text, reference, truncated = float32_reference
    encoder = Encoder(MODEL, backend=name, warn_truncation=False)
    vectors = encoder.encode([*texts, long_text, long_text + " and then some more words at the very end"])
    assert encoder.backend.name == name
    cosines = [float(np.dot(ours, theirs)) for ours, theirs in zip(vectors, reference, strict=False)]  # type: ignore[arg-type]
    assert min(cosines) >= 0.999
    assert float(np.dot(vectors[-1], vectors[-2])) >= 0.99999  # words past the limit change nothing  # type: ignore[arg-type]
    assert encoder.stats.truncated == truncated + 1  # the same texts count as cut


EXPORTS = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}  # the files each backend keeps


@warm_exports  # the cached export is the session's; this test makes the ones after it
@pytest.mark.parametrize("name", EXPORTS)
def test_an_export_is_cached_and_a_corrupted_or_stale_one_is_rebuilt(name: str, cache: Path) -> None:
    """Each file the backend keeps, cut short in turn, is exported again; then a record from an older pgsim
    has every file exported again (one stale export for all of a backend's files: exporting is the slow part)."""
    model, revision = load_model(MODEL), model_revision(MODEL)
    probe = ["a chess engine with a graphical board"]
    first = build(name, model, MODEL, revision)
    for damaged in EXPORTS[name]:
        (exported,) = cache.glob(f"{name}/*/{damaged}")
        written = exported.stat().st_mtime_ns
        build(name, model, MODEL, revision)
        assert exported.stat().st_mtime_ns == written, damaged  # reused, not exported again

        exported.write_bytes(exported.read_bytes()[: exported.stat().st_size // 3])  # a copy cut short
        with pytest.warns(UserWarning, match="unusable .*exporting again"):
            rebuilt = build(name, model, MODEL, revision)
        assert float(np.dot(rebuilt.embed(probe)[0], first.embed(probe)[0])) >= 0.99999, damaged

    exports = [exported for damaged in EXPORTS[name] for exported in cache.glob(f"{name}/*/{damaged}")]
    assert len(exports) == len(EXPORTS[name])
    meta = exports[0].parent / "export.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 0}))  # written by an older pgsim
    written = [exported.stat().st_mtime_ns for exported in exports]
    build(name, model, MODEL, revision)
    assert all(exported.stat().st_mtime_ns != before for exported, before in zip(exports, written, strict=True))
    assert json.loads(meta.read_text())["format"] == EXPORT_FORMAT


MISSING_RUNTIMES = {  # backend: (the package it imports, what the error tells the user to install)
    "onnx": ("onnxruntime", r"pip install 'pgsim\[onnx\]'"),
    "openvino": ("openvino", "pip install openvino"),
}


def test_a_missing_runtime_says_what_to_install_and_auto_goes_on_without_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both runtimes missing at once: each backend says what to install, and one measurement by auto shows
    that it goes on without either (one measurement instead of one per runtime: auto's is the slow part)."""
    for package, _ in MISSING_RUNTIMES.values():
        monkeypatch.setitem(sys.modules, package, None)  # what an environment without the package sees
    model, revision = load_model(MODEL), model_revision(MODEL)
    for name, (_, advice) in MISSING_RUNTIMES.items():
        with pytest.raises(BackendUnavailable, match=advice):
            build(name, model, MODEL, revision)
    with caplog.at_level(logging.INFO, logger="pgsim.encoding.backends"):
        chosen = choose(model, MODEL, revision, calibration_texts())
    assert chosen.name not in MISSING_RUNTIMES
    for name in MISSING_RUNTIMES:
        assert f"{name} is not a candidate here" in caplog.text
    assert "encoder backend" in caplog.text


FAILING_EXPORTS = {  # backend: (module, function that writes the export, its argument that is the file, message)
    "onnx": ("torch.onnx", "export", 2, "Exporting the model to ONNX failed: RuntimeError"),
    "openvino": ("openvino", "save_model", 1, "Converting the model to OpenVINO failed: RuntimeError"),
}


def test_a_failed_export_leaves_nothing_behind_and_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both exports fail at once, each after writing half a file: auto measures once, warns why each is not
    a candidate (the BackendUnavailable that building it raised, message included) and chooses another, and
    neither failure leaves a file behind."""
    import importlib

    def broken_export(name: str, written: int) -> Callable[..., None]:
        def export(*args: object, **kwargs: object) -> None:
            partial = Path(str(args[written]))  # half a file, as a crash or a full disk leaves it
            partial.write_bytes(b"half")
            if name == "openvino":  # its weights go to a .bin beside the .xml
                partial.with_suffix(".bin").write_bytes(b"half")
            raise RuntimeError("unsupported operator aten::something")

        return export

    for name, (module, function, written, _) in FAILING_EXPORTS.items():
        monkeypatch.setattr(importlib.import_module(module), function, broken_export(name, written))
    model, revision = load_model(MODEL), model_revision(MODEL)
    with caplog.at_level(logging.WARNING, logger="pgsim.encoding.backends"):
        assert choose(model, MODEL, revision, calibration_texts()).name not in FAILING_EXPORTS
    for name, (*_, message) in FAILING_EXPORTS.items():
        assert f"{name} is not a candidate here: {message}" in caplog.text
        assert not list(Path(backends.cache_dir()).glob(f"{name}/*/*"))  # the partial files were removed
        assert Path(backends.cache_dir(), name).is_dir()  # the export was attempted where it would be kept


def test_a_cache_that_cannot_be_written_is_a_clear_error_and_auto_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    monkeypatch.setenv("PGSIM_CACHE_DIR", str(not_a_directory))
    model, revision = load_model(MODEL), model_revision(MODEL)
    for name in EXPORTS:
        with pytest.raises(BackendUnavailable, match="Cannot write the export to .*set PGSIM_CACHE_DIR"):
            build(name, model, MODEL, revision)
    assert choose(model, MODEL, revision, calibration_texts()).name not in EXPORTS  # one measurement for both


@warm_exports
def test_the_openvino_backend_reports_nothing_to_intel_unless_the_user_said_yes(tmp_path: Path, cache: Path) -> None:
    # Importing openvino (and openvino.convert_model) reports usage and writes a client id under ~/intel when
    # no consent file exists and no CI variable is set; pgsim must not do that for the user. A fresh process,
    # since this one imported openvino long ago.
    import os
    import subprocess

    script = (
        "from pgsim.encoding.encoder import Encoder; import openvino_telemetry; "
        "Encoder('all-MiniLM-L6-v2', backend='openvino').encode(['a text']); "
        "print(openvino_telemetry.Telemetry().consent)"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    environment["HTTPS_PROXY"] = "http://127.0.0.1:9"  # whatever is sent goes nowhere (urllib honours it)
    for home, expected in [("never-asked", "False"), ("said-yes", "True")]:
        (tmp_path / home).mkdir()
        if expected == "True":  # what `opt_in_out --opt_in` records
            (tmp_path / home / "intel").mkdir()
            (tmp_path / home / "intel" / "openvino_telemetry").write_text("1")
        found = subprocess.run(
            [sys.executable, "-c", script],
            env={**environment, "HOME": str(tmp_path / home), "PGSIM_CACHE_DIR": str(cache)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert found.returncode == 0, found.stderr
        assert found.stdout.split()[-1] == expected
    assert list((tmp_path / "never-asked").iterdir()) == []  # no client id, no usage counter


@pytest.mark.parametrize("name", EXPORTS)
def test_a_model_an_export_cannot_reproduce_is_refused_clearly(name: str, small_model: str) -> None:
    with pytest.raises(BackendUnavailable, match=r"Transformer \+ Pooling \(\+ Normalize\) models; this one is"):
        Encoder(small_model, backend=name).encode(["text"])


@warm_exports
def test_auto_measures_once_says_which_and_remembers(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, revision = load_model(MODEL), model_revision(MODEL)
    with caplog.at_level(logging.INFO, logger="pgsim.encoding.backends"):
        first = choose(model, MODEL, revision, calibration_texts())
    assert f"encoder backend {first.name} (auto: measured " in caplog.text and " torch " in caplog.text
    (remembered,) = json.loads((cache / "backend-choices.json").read_text()).values()
    assert remembered["backend"] == first.name
    # the CPU's instructions decide whether bfloat16 torch is timed at all: it emulates them where they lack
    if measure.native_bfloat16():
        assert "torch-bf16" in remembered["rates"]
    else:
        assert "torch-bf16" not in remembered["rates"] and "torch-bf16 no candidate" in remembered["why"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pgsim.encoding.backends"):
        again = choose(model, MODEL, revision, calibration_texts())
    assert again.name == first.name and "chosen earlier: measured " in caplog.text


def test_an_unknown_backend_is_an_error() -> None:
    with pytest.raises(
        InvalidInput, match="Unknown encoder backend 'gpu'; choose auto, torch, torch-bf16, onnx, openvino"
    ):
        Encoder(MODEL, backend="gpu")


def calibration_texts() -> list[str]:
    return calibration.shortest()  # enough to compare and to time; keeps the tests quick


class Recording:
    """A backend that records where and with how many torch threads each batch ran; its vectors are the
    real model's (``inner``), or it fails on the batch numbered ``fail_at``, and the batches after that one
    wait (up to 2 s) for ``gate``, so that whether they were cancelled does not depend on timing."""

    def __init__(self, inner: backends.Backend | None = None, parallel: bool = True, fail_at: int = -1) -> None:
        self.inner, self.parallel, self.fail_at = inner, parallel, fail_at
        self.name, self.reason, self.precision = "recording", "test", None
        self.calls: list[tuple[str, int]] = []
        self.gate = threading.Event()

    def for_lanes(self, lanes: int) -> Recording:
        return self

    def embed(self, texts: list[str]) -> backends.Matrix:
        import torch

        self.calls.append((threading.current_thread().name, torch.get_num_threads()))
        if len(self.calls) - 1 == self.fail_at:
            raise RuntimeError("lane failed")
        if 0 <= self.fail_at < len(self.calls) - 1:
            self.gate.wait(2)
        if self.inner is None:
            return np.full((len(texts), 2), len(texts[0]), dtype=np.float32)
        return self.inner.embed(texts)


def test_lanes_run_batches_side_by_side_in_order_with_the_same_vectors(packages: list[Package]) -> None:
    import torch

    # 48 distinct synopses (3-11 words, so batches of 4 pad to different lengths): which text each vector
    # belongs to is the point, not how long the texts are
    texts = [p.synopsis for p in packages[:48]]
    batches = [texts[start : start + 4] for start in range(0, len(texts), 4)]
    threads = torch.get_num_threads()
    one_lane = Recording(build("torch", load_model(MODEL), MODEL, ""))
    two_lanes = Recording(one_lane.inner)
    expected = np.concatenate(list(lanes.embed_batches(one_lane, batches, lanes=1)))
    found = np.concatenate(list(lanes.embed_batches(two_lanes, batches, lanes=2)))
    assert {name for name, _ in one_lane.calls} == {"MainThread"}
    assert len({name for name, _ in two_lanes.calls}) == 2
    assert all(name.startswith("pgsim-encode") and count == max(1, threads // 2) for name, count in two_lanes.calls)
    assert float(np.min(np.sum(expected * found, axis=1))) >= 0.99999  # each vector stays with its text
    assert torch.get_num_threads() == threads


def test_a_failing_lane_stops_the_rest_and_leaves_other_threads_their_torch_threads() -> None:
    import torch

    threads = torch.get_num_threads()
    failing = Recording(fail_at=2)
    with pytest.raises(RuntimeError, match="lane failed"):
        list(lanes.embed_batches(failing, [[f"text {i}"] for i in range(40)], lanes=2))
    assert len(failing.calls) <= 2 + 1 + 2  # before, the failure, one more per lane; the rest were cancelled
    running = lanes.embed_batches(Recording(), [[f"text {i}"] for i in range(40)], lanes=2)
    assert next(running).shape == (1, 2)
    assert torch.get_num_threads() == threads  # the caller keeps its threads while the lanes run
    seen: list[int] = []
    resume = threading.Event()

    def first_use_during_the_lanes() -> None:
        seen.append(torch.get_num_threads())
        resume.wait(10)
        seen.append(torch.get_num_threads())

    other = threading.Thread(target=first_use_during_the_lanes)
    other.start()
    running.close()  # the caller stops early
    resume.set()
    other.join()
    assert seen == [threads, threads]  # a thread that first used torch meanwhile got the process's count
    assert torch.get_num_threads() == threads


def test_a_backend_with_its_own_threads_runs_one_batch_at_a_time() -> None:
    onnx_like = Recording(parallel=False)
    list(lanes.embed_batches(onnx_like, [["a"], ["bb"], ["ccc"]], lanes=2))
    assert [name for name, _ in onnx_like.calls] == ["MainThread"] * 3


@pytest.mark.parametrize("lanes", [0, -1, True, 1.5, "2"])
def test_bad_lanes_are_an_error(lanes: object) -> None:
    with pytest.raises(InvalidInput, match="lanes must be a whole number >= 1"):
        Encoder(MODEL, lanes=lanes)  # type: ignore[arg-type]


def test_nan_from_a_lane_is_an_error_and_stops_the_lanes() -> None:
    import torch

    class NaNOnSecondBatch(Recording):
        def embed(self, texts: list[str]) -> backends.Matrix:
            rows = super().embed(texts)
            if len(self.calls) > 2:
                self.gate.wait(2)
            return rows * np.nan if len(self.calls) == 2 else rows

    fake = NaNOnSecondBatch()

    class WithFake(Encoder):
        @property
        def backend(self) -> backends.Backend:
            return fake

    threads = torch.get_num_threads()
    encoder = WithFake(MODEL, batch_size=1, lanes=2)
    with pytest.raises(InvalidInput, match="produced NaN or infinite values"):
        encoder.encode([f"text number {i}" for i in range(30)])
    assert torch.get_num_threads() == threads
    assert len(fake.calls) <= 2 + 2  # the NaN batch and the one before it, then one more per lane


def test_the_torch_backend_encodes_as_model_encode_does_default_prompt_included(packages: list[Package]) -> None:
    import copy

    texts = [p.text for p in packages[:8]]
    model = load_model(MODEL)
    plain = TorchBackend(model, "torch").embed(texts)
    assert float(np.min(np.sum(plain * model.encode(texts, normalize_embeddings=True), axis=1))) >= 0.99999
    prompted = copy.deepcopy(model)
    prompted.prompts, prompted.default_prompt_name = {"document": "a Debian package: "}, "document"
    with_prompt = TorchBackend(prompted, "torch").embed(texts)
    expected = prompted.encode(texts, normalize_embeddings=True)
    assert float(np.min(np.sum(with_prompt * expected, axis=1))) >= 0.99999
    assert float(np.max(np.sum(with_prompt * plain, axis=1))) < 0.9999  # the prompt was really prepended


@warm_exports
@pytest.mark.parametrize("name", EXPORTS)
def test_exported_backends_prepend_the_default_prompt_as_model_encode_does(name: str, packages: list[Package]) -> None:
    import copy

    texts = [p.text for p in packages[:8]]
    prompted = copy.deepcopy(load_model(MODEL))
    prompted.prompts, prompted.default_prompt_name = {"document": "a Debian package: "}, "document"
    vectors = build(name, prompted, MODEL, model_revision(MODEL)).embed(texts)
    assert float(np.min(np.sum(vectors * prompted.encode(texts, normalize_embeddings=True), axis=1))) >= 0.999
    plain = build(name, load_model(MODEL), MODEL, model_revision(MODEL)).embed(texts)
    assert float(np.max(np.sum(vectors * plain, axis=1))) < 0.9999


@warm_exports
def test_openvino_passes_run_side_by_side_with_the_same_vectors(packages: list[Package]) -> None:
    import torch

    # 48 distinct synopses (3-11 words, so batches of 4 pad to different lengths): which text each vector
    # belongs to is the point, not how long the texts are
    texts = [p.synopsis for p in packages[:48]]
    batches = [texts[start : start + 4] for start in range(0, len(texts), 4)]
    openvino = build("openvino", load_model(MODEL), MODEL, model_revision(MODEL))
    one_lane = np.concatenate(list(lanes.embed_batches(openvino, batches, lanes=1)))
    two_lanes = np.concatenate(list(lanes.embed_batches(openvino, batches, lanes=2)))
    assert lanes.lane_count(openvino, 2, len(batches)) == 2
    two, one = openvino.for_lanes(2).compiled, openvino.for_lanes(1).compiled
    assert two.get_property("NUM_STREAMS") == 2
    assert two.get_property("ENABLE_CPU_PINNING") is False  # pinned, two worker processes share one core
    assert one.get_property("INFERENCE_NUM_THREADS") == torch.get_num_threads()  # a pass alone uses every thread
    assert float(np.min(np.sum(one_lane * two_lanes, axis=1))) >= 0.99999  # each vector stays with its text
    results: dict[int, backends.Matrix] = {}
    callers = [
        threading.Thread(target=lambda i=i: results.update({i: np.concatenate(list(map(openvino.embed, batches * 4)))}))
        for i in range(3)
    ]  # three callers at once share the compiled model, each pass on an infer request of its own (four passes
    # over the short texts each, so that the callers' passes overlap as long as one over longer texts did)
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    expected = np.concatenate([one_lane] * 4)
    assert all(float(np.min(np.sum(expected * found, axis=1))) >= 0.99999 for found in results.values())
    assert len(results) == 3
