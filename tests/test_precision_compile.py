"""`usema infer --precision/--compile` and `train.compile`: reduced precision and compiled networks give the
float32 eager results within stated tolerances, a precision the device cannot run is refused in one line before
anything is written, and a compiled run's checkpoints are plain eager checkpoints."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from usema.cli import main
from usema.config import load_recipe, recipe_to_dict
from usema.errors import UsemaError
from usema.inference import precision
from usema.inference.model_loading import load_model
from usema.inference.pipeline import InferenceOptions, predict_case, segment_case
from usema.nets import USEMA
from usema.run.checkpoint import save_checkpoint
from usema.training.command import check_resume_recipe

from synthetic_data import TINY_USEMA
from test_inference import make_checkpoint

CPU = torch.device("cpu")
# bf16 keeps 8 significant bits: a tiny USEMA's softmax moves by about 0.02 here; 0.05 leaves room for other CPUs'
# bf16 kernels (AVX512-BF16 vs AMX) without hiding a float16 overflow or a wrong cast (those move it by ~1)
BF16_PROBABILITY_TOLERANCE = 0.05
# inductor reorders and fuses float32 arithmetic; the logits of eager and compiled networks differ by ~1e-6 here
COMPILE_LOGIT_TOLERANCE = 1e-4


def usema_tiny_checkpoint(path: Path) -> Path:
    """A run-format checkpoint around USEMA(2, 1, 3, preset="tiny") with its default (seeded random) weights."""
    torch.manual_seed(0)
    network = USEMA(2, 1, 3, preset="tiny")
    recipe = {"name": "t", "data": {"source": "demo_brain", "normalization": "zscore", "patch_size": [64, 64]}}
    payload = {
        "model": network.state_dict(),
        "network": {"name": "usema", "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "preset": "tiny",
                    "overrides": {}},
        "recipe": recipe,
        "norm_stats": None,
        "labels": {"0": "background", "1": "a", "2": "b"},
    }
    return save_checkpoint(payload, path)


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(1, *shape) smooth bright blobs on a noisy background: structure the network's windows respond to."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    image = rng.normal(0.0, 0.2, shape)
    for centre, radius in zip(rng.uniform(0, shape, (6, len(shape))), rng.uniform(4, 12, 6)):
        image += np.exp(-((grid - centre) ** 2).sum(-1) / (2 * radius**2))
    return image[None].astype(np.float32)


# --------------------------------------------------------------------------------------------- precision
def test_bf16_on_cpu_gives_the_fp32_probabilities_within_tolerance(tmp_path: Path):
    if not precision.cpu_supports_bf16():
        pytest.skip("this processor has no native bfloat16 kernels (--precision bf16 is refused on it)")
    model = load_model(usema_tiny_checkpoint(tmp_path / "tiny.pt"))
    image = blobs((96, 80))
    results = {}
    for name in ("fp32", "bf16"):
        options = InferenceOptions(precision=name, save_probabilities=True, progress=False)
        results[name] = segment_case(model, image.copy(), options, CPU)
    (labels32, probs32), (labels16, probs16) = results["fp32"], results["bf16"]

    assert probs16.dtype == np.float32  # everything after the forward stays float32
    assert np.abs(probs16 - probs32).max() <= BF16_PROBABILITY_TOLERANCE
    assert np.abs(probs16 - probs32).max() > 0  # bf16 did run: a silent fp32 fallback would match exactly
    # an untrained network has many near-ties; wherever fp32's two best classes are further apart than bf16 can
    # move a probability (twice the tolerance), bf16 must pick the same class
    top2 = np.sort(probs32, axis=0)[-2:]  # probabilities are (classes, *spatial)
    decided = (top2[1] - top2[0]) > 2 * BF16_PROBABILITY_TOLERANCE
    assert decided.mean() > 0.5  # the check covers most pixels
    np.testing.assert_array_equal(labels16[decided], labels32[decided])


def test_auto_is_fp16_on_cuda_and_fp32_on_the_cpu():
    assert precision.autocast_dtype("auto", CPU) is None
    assert precision.autocast_dtype("fp32", CPU) is None
    assert precision.autocast_dtype("auto", torch.device("cuda", 0)) is torch.float16


def test_bf16_is_refused_on_a_cpu_without_bf16_kernels(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(UsemaError, match=r"^--precision bf16: expected a processor with bfloat16 support"):
        precision.autocast_dtype("bf16", CPU)


def test_fp16_on_cpu_is_refused_in_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture):
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    image = tmp_path / "case.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    out = tmp_path / "out"
    argv = ["infer", str(ckpt), "--input", str(image), "--output", str(out), "--precision", "fp16", "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "usema: error: --precision fp16 needs a CUDA device; use bf16 on CPU\n"
    assert not out.exists()


def test_the_summary_line_names_the_precision(tmp_path: Path, capsys: pytest.CaptureFixture):
    if not precision.cpu_supports_bf16():
        pytest.skip("this processor has no native bfloat16 kernels")
    from PIL import Image

    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32).astype(np.uint8)).save(tmp_path / "c.png")
    out = tmp_path / "out"
    assert main(["infer", str(ckpt), "--input", str(tmp_path / "c.png"), "--output", str(out),
                 "--precision", "bf16", "--no-progress"]) == 0
    assert "; bf16)" in capsys.readouterr().out
    assert (out / "c.png").is_file()


# ------------------------------------------------------------------------------------------- inference compile
@pytest.mark.slow
def test_compiled_inference_gives_the_eager_logits(tmp_path: Path):
    model = load_model(make_checkpoint(tmp_path / "tiny.pt", normalization="zscore"))
    image = blobs((32, 32))  # one window (val.roi_size defaults to the 32 x 32 patch): one compilation
    eager = predict_case(model, image, InferenceOptions(progress=False), CPU)
    compiled = predict_case(model, image, InferenceOptions(compile=True, progress=False), CPU)

    assert compiled.dtype == torch.float32 and compiled.shape == eager.shape
    assert torch.allclose(compiled, eager, rtol=0, atol=COMPILE_LOGIT_TOLERANCE)
    assert list(model.compiled) == [(None, "cpu")]  # compiled once, kept for the next case
    assert not any(k.startswith("_orig_mod.") for k in model.network.state_dict())


def test_a_failed_compilation_is_one_line_naming_compile(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch):
    """Whatever inductor cannot do (no C++ compiler, an unsupported operator) reaches dynamo as a backend
    failure; a backend that always fails stands for it without tracing the whole network first."""
    def broken_backend(graph, example_inputs):
        raise RuntimeError("cannot find a working C++ compiler")

    torch._dynamo.reset()  # graphs compiled by earlier tests would otherwise be reused without the backend
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    from PIL import Image

    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", normalization="zscore")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "c.png")
    out = tmp_path / "out"
    assert main(["infer", str(ckpt), "--input", str(tmp_path / "c.png"), "--output", str(out),
                 "--compile", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usema: error: --compile: torch.compile could not compile the network (")
    assert err.count("\n") == 1 and err.rstrip().endswith("run without --compile")
    assert not (out / "c.png").exists()


# ---------------------------------------------------------------------------------------------- train.compile
# 1 epoch of 2 iterations, last.pt after each; the tiny test USEMA on 32 x 32 patches keeps compiling short
RUN = [
    "demo_nuclei", "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=2", "--set", "train.batch_size=1",
    "--set", "train.checkpoint_every=1", "--set", "data.patch_size=[32,32]", "--set", "data.num_workers=0",
    "--set", "val.roi_size=[128,128]", "--set", "val.overlap=0",
    *(a for k, v in TINY_USEMA.items() for a in ("--set", f"model.overrides.{k}={v}")),
]


def train(run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "USEMA_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["USEMA_FAULT"] = fault
    cmd = [sys.executable, "-m", "usema", "train", *RUN, "--output", str(run_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_a_compiled_run_writes_eager_checkpoints_and_resumes_without_compile(tmp_path: Path):
    eager = train(tmp_path / "eager")
    assert eager.returncode == 0, eager.stderr[-3000:]
    # killed after its first (compiled) step and its mid-epoch checkpoint
    compiled = train(tmp_path / "compiled", "--set", "train.compile=true", fault="train.iteration@1")
    assert compiled.returncode == -signal.SIGKILL, compiled.stderr[-3000:]
    last = tmp_path / "compiled" / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["step"] == 1

    assert list(weights(last)) == list(weights(tmp_path / "eager" / "checkpoints" / "last.pt"))
    model = load_model(last)  # builds the eager network from the spec and loads strictly
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, weights(last)[key]), key

    resumed = train(tmp_path / "compiled", "--resume")  # train.compile back to false
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["step"] == 2


def test_an_eager_checkpoint_loads_into_a_compiling_trainer(tmp_path: Path):
    """The other direction, without compiling: the trainer keeps the plain module for checkpoints, so a compile-on
    resume reads an eager checkpoint's keys as they are, and train.compile may differ on --resume."""
    from types import SimpleNamespace

    from usema.training.distributed import DistContext
    from usema.training.trainer import Trainer

    def trainer(compile_: bool) -> Trainer:
        recipe = load_recipe("demo_nuclei", ["data.num_workers=0", f"train.compile={str(compile_).lower()}"])
        data = SimpleNamespace(labels={0: "background", 1: "nucleus"}, in_channels=1, norm_stats=None,
                               train_dataset=None, val_cases=[])
        return Trainer(recipe, recipe_to_dict(recipe), data, tmp_path / "run", DistContext())

    before = torch.are_deterministic_algorithms_enabled()
    try:
        eager, compiling = trainer(False), trainer(True)
        state = eager.state_dict()
        compiling.load_state_dict(state, tmp_path / "last.pt")
        assert compiling.model is not compiling.network  # the forward goes through torch.compile
        assert list(compiling.state_dict()["model"]) == list(state["model"])
        check_resume_recipe(state["recipe"], compiling.recipe_dict, tmp_path / "last.pt")
    finally:
        torch.use_deterministic_algorithms(before)


# --------------------------------------------------------------------------------------------- train.precision
# one SGD step on one batch: bf16 autocast moves a tiny USEMA's deep-supervised Dice+CE loss by about 0.3% here
BF16_LOSS_RELATIVE_TOLERANCE = 0.03


def _train_config(**keys: object):
    return load_recipe("demo_nuclei", [f"train.{k}={v}" for k, v in keys.items()]).train


def test_train_precision_auto_follows_amp_and_explicit_ones_are_checked(monkeypatch: pytest.MonkeyPatch):
    from usema.training.trainer import training_autocast_dtype

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert training_autocast_dtype(_train_config(), CPU) is None  # auto: AMP is a CUDA matter
    assert training_autocast_dtype(_train_config(precision="fp32"), CPU) is None
    assert training_autocast_dtype(_train_config(precision="bf16"), CPU) is torch.bfloat16
    with pytest.raises(UsemaError, match=r"^train.precision fp16 needs a CUDA device; use bf16 on CPU$"):
        training_autocast_dtype(_train_config(precision="fp16"), CPU)
    with pytest.raises(UsemaError, match=r"^train.amp: false turns mixed precision off, but train.precision is bf16"):
        training_autocast_dtype(_train_config(amp="false", precision="bf16"), CPU)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(UsemaError, match=r"^train.precision bf16: expected a processor with bfloat16 support"):
        training_autocast_dtype(_train_config(precision="bf16"), CPU)


def test_a_precision_the_cpu_cannot_train_in_is_refused_before_any_write(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture):
    out = tmp_path / "run"
    assert main(["train", "demo_nuclei", "--output", str(out), "--set", "train.precision=fp16"]) == 2
    assert capsys.readouterr().err == "usema: error: train.precision fp16 needs a CUDA device; use bf16 on CPU\n"
    assert not out.exists()


def test_bf16_training_step_on_cpu_gives_the_fp32_loss_within_tolerance(tmp_path: Path):
    if not precision.cpu_supports_bf16():
        pytest.skip("this processor has no native bfloat16 kernels")
    from types import SimpleNamespace

    from usema.training.distributed import DistContext
    from usema.training.trainer import Trainer

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 64, 64, generator=generator)
    batch = {"image": image, "label": (image > 0.5).float()}  # class indices, as the patch pipeline gives them

    def step(precision_name: str) -> tuple[Trainer, float]:
        recipe = load_recipe("demo_nuclei", ["data.num_workers=0", "data.patch_size=[64,64]",
                                             f"train.precision={precision_name}"])
        data = SimpleNamespace(labels={0: "background", 1: "nucleus"}, in_channels=1, norm_stats=None,
                               train_dataset=None, val_cases=[])
        trainer = Trainer(recipe, recipe_to_dict(recipe), data, tmp_path / precision_name, DistContext())
        return trainer, trainer._train_step(batch)

    before = torch.are_deterministic_algorithms_enabled()
    try:
        (fp32, fp32_loss), (bf16, bf16_loss) = step("fp32"), step("bf16")
    finally:
        torch.use_deterministic_algorithms(before)
    assert bf16.amp_dtype is torch.bfloat16 and fp32.amp_dtype is None
    assert bf16_loss == pytest.approx(fp32_loss, rel=BF16_LOSS_RELATIVE_TOLERANCE)
    assert bf16_loss != fp32_loss  # the forward really ran in bfloat16
    # the optimiser updated float32 master weights, as in float32 training
    weights = dict(bf16.network.named_parameters())
    assert all(p.dtype == torch.float32 for p in weights.values())
    moved = [(weights[k] - p).abs().max().item() for k, p in fp32.network.named_parameters()]
    assert max(moved) < 0.01


def test_a_run_stored_before_train_precision_existed_resumes_as_auto(tmp_path: Path):
    recipe = recipe_to_dict(load_recipe("demo_nuclei"))
    stored = {**recipe, "train": {k: v for k, v in recipe["train"].items() if k != "precision"}}
    check_resume_recipe(stored, recipe, tmp_path / "last.pt")  # auto: what the run did
    bf16 = recipe_to_dict(load_recipe("demo_nuclei", ["train.precision=bf16"]))
    with pytest.raises(UsemaError, match=r"train.precision: 'auto' -> 'bf16'"):
        check_resume_recipe(stored, bf16, tmp_path / "last.pt")
