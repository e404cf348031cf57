"""benchmarks/report.py's run header: the CPU line names the x86 family / model (a VM's brand string alone does not
tell a Zen 4 from a Zen 5 EPYC, and the CPU results depend on it)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import report  # noqa: E402


def _run(cpu):
    return {"machine_info": {"cpu": cpu, "vitkernels": {"device_type": "cpu", "cpu_threads": 2,
                                                        "allocator": "glibc default", "torch": "2.13.0+cpu"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}, "datetime": "2026-12-03T03:00:00+00:00"}


def test_cpu_label_names_family_model_and_simd():
    zen4 = {"brand_raw": "AMD EPYC", "family": 25, "model": 17, "flags": ["avx2", "avx512f", "fma"]}
    zen5 = {"brand_raw": "AMD EPYC", "family": 26, "model": 2, "flags": ["avx2", "avx512f"]}
    assert report.cpu_label(zen4) == "AMD EPYC, x86 family 25 model 17, AVX-512"
    assert report.cpu_label(zen5) == "AMD EPYC, x86 family 26 model 2, AVX-512"
    assert report.cpu_label({"brand_raw": "Some CPU", "family": 6, "model": 85, "flags": ["avx2"]}) == \
        "Some CPU, x86 family 6 model 85, AVX2"


def test_cpu_label_without_family_is_the_brand():
    assert report.cpu_label({"brand_raw": "AMD EPYC"}) == "AMD EPYC"
    assert report.cpu_label({}) == "unknown"


def test_header_carries_the_cpu_label_and_commit():
    text = report.header(_run({"brand_raw": "AMD EPYC", "family": 25, "model": 17, "flags": ["avx512f"]}))
    assert text.startswith("device: CPU (AMD EPYC, x86 family 25 model 17, AVX-512, 2 threads); allocator: glibc default")
    assert "commit 0123456789;" in text
