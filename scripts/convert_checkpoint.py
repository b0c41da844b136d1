"""Convert a GGUF file or an HF safetensors directory to a Ferry (Orbax) checkpoint.

usage: python scripts/convert_checkpoint.py SRC DST [--dtype bfloat16|float32|float16] [--overwrite]
(same as ``ferry convert``)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    from ferry.models.convert import convert
    try:
        convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
