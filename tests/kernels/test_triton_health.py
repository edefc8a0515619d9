"""F7 (GPU readiness review): a CUDA device where Triton kernels cannot launch (Triton's bundled CUDA 13 ptxas
on a CUDA 12 driver: "device kernel image is invalid", or a PTXASError) is found by one probe launch at
start-up; `auto` falls back to the PyTorch kernels with one warning naming the fix, explicit `triton` raises
one line naming it. No GPU here: the failing launch is simulated by making the probe raise the errors Triton
raises; the probe kernel itself runs under the Triton interpreter."""
from __future__ import annotations

import types
import warnings

import pytest
import torch
from triton.runtime.errors import PTXASError

from align.kernels import _common, health
from align.rollouts import RolloutEngine

GPU0 = torch.device("cuda", 0)
FAILURES = [RuntimeError("Triton Error [CUDA]: device kernel image is invalid"),
            PTXASError("PTXAS error: Internal Triton PTX codegen error\nptxas fatal : Unsupported .version 9.4")]


@pytest.fixture
def broken(monkeypatch, request):
    calls = []

    def fail(device):
        calls.append(device)
        raise request.param

    monkeypatch.setattr(health, "_probe", fail)
    monkeypatch.setattr(health, "_RESULT", {})
    monkeypatch.setattr(health, "_WARNED", set())
    return calls


@pytest.mark.parametrize("broken", FAILURES, indirect=True, ids=["invalid-image", "ptxas"])
def test_auto_falls_back_with_one_warning_and_probes_once(broken):
    with pytest.warns(RuntimeWarning, match="TRITON_PTXAS_BLACKWELL_PATH=/usr/local/cuda/bin/ptxas") as rec:
        assert health.startup_backend("auto", GPU0) == "torch"
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second probe
        assert health.startup_backend("auto", GPU0) == "torch"
        fake_cuda_tensor = types.SimpleNamespace(is_cuda=True, device=GPU0)
        assert _common.resolve_backend("auto", fake_cuda_tensor, "sample") == "torch"
    assert broken == [GPU0]


@pytest.mark.parametrize("broken", FAILURES, indirect=True, ids=["invalid-image", "ptxas"])
def test_explicit_triton_raises_one_line_naming_the_fix(broken, request):
    with pytest.raises(RuntimeError) as err:
        health.startup_backend("triton", GPU0)
    msg = str(err.value)
    assert "\n" not in msg and "cuda:0" in msg and "TRITON_PTXAS_BLACKWELL_PATH=/usr/local/cuda/bin/ptxas" in msg
    error = request.node.callspec.params["broken"]
    assert f"{type(error).__name__}: {str(error).splitlines()[0]}" in msg  # the error's first line is quoted
    with pytest.raises(RuntimeError, match="backend='triton'"):
        _common.resolve_backend("triton", types.SimpleNamespace(is_cuda=True, device=GPU0), "token_logprobs")


@pytest.mark.parametrize("broken", FAILURES[:1], indirect=True)
def test_torch_backend_and_cpu_never_probe(broken, tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert health.startup_backend("torch", GPU0) == "torch"
    assert health.startup_backend("auto", torch.device("cpu")) == "auto"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert RolloutEngine(model, AutoTokenizer.from_pretrained(tiny_model_path)).sampler_backend == "auto"
    assert broken == []


def test_probe_kernel_runs_and_checks_its_output(monkeypatch):
    """The real probe, in the interpreter on a CPU tensor: it launches and its output check passes."""
    monkeypatch.setattr(health, "_RESULT", {})
    assert health.launch_error(torch.device("cpu", 0)) is None


@pytest.mark.gpu
def test_gpu_probe_passes_on_a_working_device(monkeypatch):
    monkeypatch.setattr(health, "_RESULT", {})
    assert health.launch_error(torch.device("cuda", torch.cuda.current_device())) is None
    assert health.startup_backend("auto", torch.device("cuda", 0)) == "auto"
