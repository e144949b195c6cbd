#!/usr/bin/env python3
"""Host cost of one ``select_blocks`` call: 200 calls back to back, one synchronisation at the end.

At small T the GPU waits for the launch code, so ``host`` (the time to issue the calls) is the call's cost; at
large T ``wall`` exceeds it by the kernels' time. Usage on a GPU: ``python3 kernels/tools/select_host_cost.py``.
"""

import time

import torch

import ssa_kernels as K


def main() -> None:
    for t, hq, hkv, block_size, top_k in ((1024, 32, 2, 16, 16), (8192, 32, 2, 16, 16), (8192, 32, 2, 64, 32)):
        q = torch.randn(t, 1, hq, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(t, 1, hkv, 64, device="cuda", dtype=torch.bfloat16)
        for _ in range(20):
            K.select_blocks(q, k, block_size, top_k)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            K.select_blocks(q, k, block_size, top_k)
        host = (time.perf_counter() - t0) / 200
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 200
        print(f"T={t} {block_size}x{top_k}: host {1e3 * host:.3f} ms/call, wall {1e3 * wall:.3f} ms/call")


if __name__ == "__main__":
    main()
