"""docs/cuda.md's table of what the memory policy picks is computed from the policy itself."""
import re
from pathlib import Path

import pytest
import torch

from plastic_ops import ops

DOC = Path(__file__).resolve().parents[1] / "docs" / "cuda.md"
GiB = 2**30
T, N = 106, 1000
CARDS = (("H100 80 GB, 78 GiB available", 78 * GiB), ("H200 141 GB, 139 GiB available", 139 * GiB))
ROWS = ((1, torch.float32), (8, torch.float32), (32, torch.float32), (128, torch.float32), (256, torch.float32),
        (1024, torch.float32), (1024, torch.bfloat16))


def _cell(B, dtype, available, compiled):
    trace_bytes = B * N * N * (4 if dtype == torch.float32 else 2)
    # a compiled call does not ask the device: its limit is fixed and nothing is checked against memory
    limit = ops.KEEP_ALL_TRACES_BYTES["cuda"] if compiled else int(ops.CUDA_KEEP_FRACTION * available)
    try:
        K = ops.choose_checkpoint_every(T, trace_bytes, limit=limit, device="cuda",
                                        available=float("inf") if compiled else available, batch=B, trace_dtype=dtype)
    except torch.cuda.OutOfMemoryError:
        K = ops.fewest_traces_every(T)
        return f"error: needs {ops.traces_held(T, K) * trace_bytes / GiB:.1f} GiB"
    held = T + 2 if K == 1 else ops.traces_held(T, K)
    return f"K = {K} ({held * trace_bytes / GiB:.1f} GiB)"


def policy_table() -> str:
    head = ["B", "trace", "T traces"] + [name for name, _ in CARDS] + ["under torch.compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for B, dtype in ROWS:
        size = T * B * N * N * (4 if dtype == torch.float32 else 2)
        cells = [str(B), str(dtype).replace("torch.", ""), f"{size / GiB:.1f} GiB"]
        cells += [_cell(B, dtype, avail, False) for _, avail in CARDS]
        cells.append(_cell(B, dtype, CARDS[0][1], True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_the_documented_table_is_the_policys(keep_traces_bytes):
    keep_traces_bytes(None)
    text = DOC.read_text()
    found = re.search(r"<!-- memory-policy-table:begin -->\n(.*?)\n<!-- memory-policy-table:end -->", text, re.S)
    assert found, "docs/cuda.md lost its memory-policy table markers"
    expected = policy_table()
    assert found.group(1).strip() == expected, "docs/cuda.md's table is stale; the policy gives:\n" + expected


if __name__ == "__main__":  # prints the table for docs/cuda.md
    print(policy_table())
