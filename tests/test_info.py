"""What was built (plastic_ops.info) and the messages for an extension that cannot be used."""
from __future__ import annotations

import json

import pytest
import torch

import plastic_ops
from plastic_ops import _extension, info

OPS = ["plastic_ops::plastic_linear_backward", "plastic_ops::plastic_linear_forward",
       "plastic_ops::plastic_rnn_backward", "plastic_ops::plastic_rnn_forward"]


def test_collect_reports_this_build():
    got = info.collect()
    assert got["version"] == plastic_ops.__version__
    assert got["extension_loaded"] and got["extension_error"] is None
    assert got["built"] is not None, "setup.py writes _build_info.json beside the compiled module"
    assert got["built"]["torch"] == torch.__version__ == got["running"]["torch"]
    assert sorted(got["kernels"]) == OPS
    for name, keys in got["kernels"].items():
        assert "CPU" in keys and "Meta" in keys, name
        assert ("CUDA" in keys) == got["built"]["with_cuda"], name
    assert "Autograd" in got["kernels"]["plastic_ops::plastic_rnn_forward"]
    text = info.format_report(got)
    assert f"plastic_ops {plastic_ops.__version__}" in text and "compiled extension: loaded" in text
    assert ("CUDA kernels: built" if got["built"]["with_cuda"] else "CUDA kernels: not built") in text


def test_architectures_and_which_gpus_they_run_on():
    flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_86,code=sm_86",
             "-gencode=arch=compute_90,code=compute_90", "-gencode=arch=compute_90,code=sm_90"]
    archs = info._architectures(flags)
    assert archs == ["sm_80", "sm_86", "sm_90", "compute_90 (PTX)"]
    assert info._runs_on((8, 0), archs) == "yes (sm_80 code)"
    assert info._runs_on((8, 9), archs) == "yes (sm_86 code)"  # same major, the highest minor not above it
    assert info._runs_on((9, 0), archs) == "yes (sm_90 code)"
    assert "PTX compute_90" in info._runs_on((12, 0), archs)
    assert info._runs_on((7, 5), archs).startswith("no kernel for sm_75")


def test_build_for_another_torch_release_is_not_loaded(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch": "1.13.1", "with_cuda": False})
    monkeypatch.setattr(_extension, "_error", None)
    with pytest.warns(RuntimeWarning, match="built against torch 1.13.1"):
        assert _extension.load() is False
    with pytest.raises(RuntimeError, match=r"built against torch 1\.13\.1 but torch .* is running.*--no-build-isolation"):
        plastic_ops.plastic_linear(torch.randn(2, 1, 3), torch.randn(3, 2), torch.tensor(0.1), 0.1)


def test_undefined_symbol_says_rebuild(monkeypatch, tmp_path):
    pkg = tmp_path / "site" / "plastic_ops"
    pkg.mkdir(parents=True)
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(_extension, "PACKAGE_DIR", pkg)
    monkeypatch.setattr(_extension, "build_info", lambda: None)
    msg = _extension._explain(ImportError("_C.so: undefined symbol: _ZN5torch7Library"))
    assert "built against another torch" in msg and "undefined symbol" in msg


def test_unbuilt_checkout_names_the_installed_copy(monkeypatch, tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "plastic_ops").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    installed = tmp_path / "site-packages"
    (installed / "plastic_ops").mkdir(parents=True)
    (installed / "plastic_ops" / "_C.abi3.so").write_bytes(b"")
    monkeypatch.setattr(_extension, "PACKAGE_DIR", checkout / "plastic_ops")
    monkeypatch.setattr("sys.path", [str(checkout), str(installed)])
    msg = _extension._explain(ImportError("No module named 'plastic_ops._C'"))
    assert "unbuilt source checkout" in msg and str(installed / "plastic_ops") in msg
    assert "run from another folder" in msg


def test_build_info_file_matches_the_loaded_module():
    written = json.loads(_extension.INFO_FILE.read_text())
    assert written == _extension.build_info()
    assert written["python"] == "%d.%d" % __import__("sys").version_info[:2]


def test_report_from_an_unbuilt_checkout_says_what_the_installed_copy_holds(monkeypatch, tmp_path):
    # `python -m plastic_ops.info` from the root of an unbuilt checkout imports the checkout; the report
    # then says what the installed copy it hides was built with, and how to reach it
    installed = tmp_path / "site-packages" / "plastic_ops"
    installed.mkdir(parents=True)
    (installed / "_C.abi3.so").write_bytes(b"")
    (installed / "_build_info.json").write_text(json.dumps(
        {"torch": "2.4.1+cu121", "python": "3.11", "with_cuda": False, "no_cuda_reason": "CPU-only build"}))
    monkeypatch.setattr(_extension, "_error", ImportError("unbuilt"))
    monkeypatch.setattr(_extension, "_installed_copies", lambda: [str(installed)])
    got = info.collect()
    assert got["shadowed_copies"] == [{"path": str(installed), "built": json.loads(
        (installed / "_build_info.json").read_text())}]
    text = info.format_report(got)
    assert f"installed copy, hidden by this folder: {installed}: built against torch 2.4.1+cu121" in text
    assert "no CUDA kernels (CPU-only build)" in text and "Run from another folder" in text
