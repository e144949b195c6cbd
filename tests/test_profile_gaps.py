"""tools/profile_gaps.py: GPU idle gaps of a profiler trace, charged to the host range that launched the work
ending each gap."""

import gzip
import json

import pytest

from helpers.tools import load_tool


def _trace(path):
    def ev(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [
        ev("user_annotation", "ssa_train/forward_backward", 0, 1000),
        ev("user_annotation", "ssa_train/optimizer", 1000, 400),
        ev("cpu_op", "aten::item", 1050, 300),
        ev("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=1),
        ev("cuda_runtime", "cudaLaunchKernel", 20, 5, correlation=2),
        ev("cuda_runtime", "cudaLaunchKernel", 1300, 5, correlation=3),
        ev("kernel", "gemm", 100, 500, correlation=1),
        ev("kernel", "overlapping", 550, 450, correlation=2),  # merges with gemm: busy 100..1000
        ev("kernel", "adam", 1320, 80, correlation=3),  # gap 1000..1320, launched inside the optimizer range
    ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_gaps_are_charged_to_the_host_range_of_the_late_launch(tmp_path):
    tool = load_tool("profile_gaps")
    r = tool.analyse(tool.load_events(_trace(tmp_path / "t.json.gz")), min_us=50)
    assert r["span_ms"] == pytest.approx(1.3) and r["busy_ms"] == pytest.approx(0.98)
    assert r["idle_ms"] == pytest.approx(0.32) and len(r["gaps"]) == 1
    gap = r["gaps"][0]
    assert gap["us"] == 320 and gap["range"] == "ssa_train/optimizer" and gap["op"] == "aten::item"
    assert r["by_range"] == {"ssa_train/optimizer": {"gaps": 1, "ms": pytest.approx(0.32)}}
    with pytest.raises(ValueError, match="no GPU kernel"):
        tool.analyse([e for e in tool.load_events(tmp_path / "t.json.gz") if e["cat"] != "kernel"])


def test_exposed_communication_is_nccl_time_without_other_gpu_work(tmp_path):
    tool = load_tool("profile_gaps")

    def ev(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {}}

    events = [ev("gemm", 0, 100), ev("flash_fwd", 150, 100),
              ev("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgs)", 50, 80),  # 50..130: 50 of it under gemm
              ev("ncclDevKernel_ReduceScatter_RING_LL(x)", 300, 40),  # nothing else runs: all exposed
              ev("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgs)", 160, 20),  # inside flash_fwd: hidden
              ev("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgs)", 400, 10)]  # the optimizer's, exposed
    events[-1]["args"] = {"Collective name": "_allgather_base", "Process Group Description": "dp_cp"}
    c = tool.communication(events)
    assert c["by_kernel"].pop("ncclDevKernel_AllGather_RING_LL (_allgather_base, group dp_cp)") == {
        "count": 1, "ms": pytest.approx(0.01), "exposed_ms": pytest.approx(0.01)}
    c = tool.communication(events[:-1])
    assert c["comm_ms"] == pytest.approx(0.14) and c["exposed_ms"] == pytest.approx(0.07)
    assert c["by_kernel"]["ncclDevKernel_AllGather_RING_LL"] == {"count": 2, "ms": pytest.approx(0.1),
                                                                 "exposed_ms": pytest.approx(0.03)}
    assert c["by_kernel"]["ncclDevKernel_ReduceScatter_RING_LL"]["exposed_ms"] == pytest.approx(0.04)
