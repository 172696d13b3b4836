#!/usr/bin/env python
"""Seed 004's data step, as its guide types it:

    python toolkits/data/parquet2json.py IN_DIR OUT.json

Every row of every .parquet file under IN_DIR as one JSON object per line (megatron_patch/data/parquet.py;
needs pyarrow: pip install 'megatron-patch[data]'). Then: megatron-patch preprocess --input OUT.json
--tokenizer MODEL_DIR --output-prefix PREFIX --append-eod. Exit status: 0 done, 2 bad input.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="directory of .parquet files (searched recursively) or one .parquet file")
    p.add_argument("output", help="JSON lines file to write")
    args = p.parse_args(argv)
    from megatron_patch.data.parquet import parquet_to_jsonl
    from megatron_patch.errors import UserError

    try:
        stats = parquet_to_jsonl(args.input, args.output)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {stats['rows']} rows from {stats['files']} parquet file(s), "
          f"columns {', '.join(stats['columns'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
