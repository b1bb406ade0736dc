#!/usr/bin/env python
"""Write generated EM-like tiles and their mitochondria masks as PNG files.

Layout: ``OUT/images/00000.png`` (8-bit greyscale) and ``OUT/masks/00000.png`` (0 = background, 255 =
mitochondrion; readable with ``ml_backend.data.read_labelled_stack``). Same seed -> same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ml_backend.data.synthetic import generate_em_like

CHUNK = 16  # images generated at once: bounded memory for any n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (images/ and masks/ are created inside)")
    parser.add_argument("-n", "--count", type=int, default=100, help="number of tiles (default: 100)")
    parser.add_argument("--size", type=int, default=256, help="tile width and height in pixels (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-masks", action="store_true", help="write images only (an unlabelled pool)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    if args.size < 8:
        parser.error("--size must be >= 8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    img_dir, mask_dir = args.out / "images", args.out / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_masks:
        mask_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(args.count - 1)))
    with tqdm(total=args.count, desc="generating tiles", unit="tile", disable=args.quiet) as bar:
        for start in range(0, args.count, CHUNK):
            n = min(CHUNK, args.count - start)
            images, masks = generate_em_like(n, args.size, args.seed, start=start)
            for k in range(n):
                name = f"{start + k:0{digits}d}.png"
                Image.fromarray(images[k]).save(img_dir / name)
                if not args.no_masks:
                    Image.fromarray(masks[k] * 255).save(mask_dir / name)
            bar.update(n)
    print(f"wrote {args.count} tiles of {args.size}x{args.size} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
