#!/usr/bin/env python
"""What compressing MGM's LR tokens saves in patch-info mining, at MGM-7B's real widths (random weights).

    python scripts/mgm/mining_cost.py [--tokens 576 192 128 64] [--repeats 3] [--dtype float32]

The HR map is ConvNeXt-L's at 768 px (2880 channels, 192 x 192); the LR tokens are CLIP-L's (1024 wide, a
24 x 24 grid); the mining projectors are MGM's (LayerNorm + Linear). A row mines T tokens on T distinct
cells (``llava.model.mgm.mining.mine_patches``: 576 = MGM's own case, every patch; fewer = the tokens a
vision-side method kept). Prints a markdown table of median CPU seconds (process time: what a shared machine
inflates least; on CUDA the calls are synchronised, and process time then counts the host only).
The ConvNeXt itself (run whole in every row) is not part of the figure.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llava.model.mgm.mining import build_mining_projectors, mine_patches

LR_WIDTH, HR_WIDTH, GRID, HR_SIDE = 1024, 2880, 24, 192


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 192, 128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for tokens in args.tokens:
        if not 1 <= tokens <= GRID * GRID:
            raise ValueError(f"--tokens must be in [1, {GRID * GRID}], got {tokens}")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    projectors = {k: v.to(args.device, dtype).eval() for k, v in build_mining_projectors(LR_WIDTH, HR_WIDTH).items()}
    hr = torch.randn(1, HR_WIDTH, HR_SIDE, HR_SIDE, device=args.device, dtype=dtype)
    print(f"| mined tokens | projected HR features | CPU seconds (median of {args.repeats}) |")
    print("| --- | --- | --- |")
    for tokens in args.tokens:
        lr = torch.randn(1, tokens, LR_WIDTH, device=args.device, dtype=dtype)
        patches = None if tokens == GRID * GRID else torch.randperm(GRID * GRID)[:tokens].sort().values[None].to(args.device)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats):
                start = time.process_time()
                mine_patches(lr, hr, patches, projectors["vlm_uni_query_projector"], projectors["vlm_uni_aux_projector"],
                             projectors["vlm_uni_val_projector"], GRID)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.process_time() - start)
        print(f"| {tokens} | {tokens * (HR_SIDE // GRID) ** 2} | {statistics.median(times):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
