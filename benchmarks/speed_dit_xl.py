"""DiT-XL/2 (28 blocks) against its depth-pruned 14- and 7-block versions: parameters, FLOPs,
latency per sampling step, images/s, peak memory and speed-up, side by side in one run
(random weights: speed does not depend on them).

    OMP_NUM_THREADS=2 python benchmarks/speed_dit_xl.py                       # this CPU, fp32, batch 2
    python benchmarks/speed_dit_xl.py --device cuda --batch-size 32 --name gpu  # a GPU, bf16

runs `leandit bench` as a user would and writes benchmarks/speed_dit_xl_<name>.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cfg-scale", default="1", help="1 = one forward of the batch per step (default 1)")
    parser.add_argument("--rounds", default="7")
    parser.add_argument("--name", default="cpu", help="suffix of the markdown file (default cpu)")
    args = parser.parse_args()
    out = HERE / f"speed_dit_xl_{args.name}.md"
    command = ["leandit", "bench", "DiT-XL/2", "DiT-XL/2:depth=14", "DiT-XL/2:depth=7", "--batch-size", str(args.batch_size),
               "--cfg-scale", args.cfg_scale, "--rounds", args.rounds, "--warmup", "2", "--device", args.device]
    subprocess.run([sys.executable, "-m", "leandit.cli", *command[1:], "--out", str(out)], check=True)
    text = out.read_text()
    header = (f"# DiT-XL/2 depth pruning: speed side by side\n\nCommand: `{' '.join(command)}` "
              f"(via `benchmarks/speed_dit_xl.py`). The linear limit of the speed-up is 28 / L' (2.00x for 14 "
              "blocks, 4.00x for 7); the TinyFusion paper measured 1.96x for 14 blocks on a GPU.\n\n")
    out.write_text(header + text)
    print(out.read_text())


if __name__ == "__main__":
    main()
