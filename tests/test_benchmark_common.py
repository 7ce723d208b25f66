"""benchmarks/common.py and benchmarks/cpuinfo.py: what every benchmark's banner and RL report print."""
import platform

import pytest

from benchmarks.common import iteration_medians
from benchmarks.cpuinfo import cpu_description


def test_cpu_description_names_family_model_and_vector_flags(tmp_path):
    """The banners' CPU line from a two-processor cpuinfo written here: the first processor's model
    name, family and model, and the VECTOR_FLAGS it has in VECTOR_FLAGS' order (not others, not the
    second processor's); a file without them falls back to platform's name with the flags unknown."""
    entry = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {fam}\nmodel\t\t: 2\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu {flags}\n\n")
    info = tmp_path / "cpuinfo"
    info.write_text(entry.format(n=0, fam=26, flags="avx512_bf16 sse4_2 avx2 avx512f fma")
                    + entry.format(n=1, fam=25, flags="amx_tile"))
    assert cpu_description(str(info)) == "AMD EPYC, family 26 model 2 (avx2 fma avx512f avx512_bf16)"
    assert cpu_description(str(tmp_path / "absent")) == (
        f"{platform.processor() or platform.machine()} (vector flags unknown)")


def test_iteration_medians_take_other_per_iteration():
    """Three iterations by hand: each stage's median on its own, and "other" as the median of each
    iteration's total minus its stages (1, 0.1, 3 -> 1), where the difference of the medians would
    read 7 - (3 + 4.9) = -0.9."""
    rows = [dict(total=10.0, time_sample_s=4.0, time_update_s=5.0),
            dict(total=6.0, time_sample_s=1.0, time_update_s=4.9),
            dict(total=7.0, time_sample_s=3.0, time_update_s=1.0)]
    out = iteration_medians(rows, ("sample", "update"))
    assert out == pytest.approx(dict(total=7.0, sample=3.0, update=4.9, other=1.0))
    assert out["total"] - out["sample"] - out["update"] == pytest.approx(-0.9)
