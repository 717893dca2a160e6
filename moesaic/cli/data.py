"""`moesaic data`: prepare private sources, or build the embedded corpora.

    moesaic data prepare --source code=PATH --source law=FILE.jsonl --out DIR \
        [--tokenizer path/tokenizer.json] [--glob "**/*.py"] [--text-field text] \
        [--heldout-fraction 0.05] [--overwrite]
    moesaic data embedded --out DIR [--size smoke]

prepare checks every source before it writes the first and writes all or none of them; a
source already in DIR is refused unless --overwrite. An input error or a full disk is one line
on stderr and exit code 2, with DIR as it was.
"""

from __future__ import annotations

import argparse
import sys

from moesaic.data import sources


def register(parser: argparse.ArgumentParser, command: str) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prep = sub.add_parser("prepare", help="local folders / JSONL files -> TFDS ArrayRecord")
    prep.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                      help="a folder (read recursively), a .jsonl file or a text file; repeat")
    prep.add_argument("--out", required=True, help="DATA_DIR; each source becomes DATA_DIR/NAME")
    prep.add_argument("--tokenizer", default="bytes",
                      help="'bytes' (default) or a Hugging Face tokenizer.json")
    prep.add_argument("--glob", default="**/*", help="which files of a folder (default: all)")
    prep.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    prep.add_argument("--heldout-fraction", type=float, default=0.05)
    prep.add_argument("--max-doc-bytes", type=int, default=sources.MAX_DOC_BYTES,
                      help="longer documents are cut into pieces at line ends")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace sources already prepared in --out")
    emb = sub.add_parser("embedded", help="build code, prose, law, math and public offline")
    emb.add_argument("--out", required=True, help="DATA_DIR")
    emb.add_argument("--size", choices=("default", "smoke"), default="default")


def _report(manifests: list[dict]) -> None:
    for m in manifests:
        tr, ho = m["splits"]["train"], m["splits"]["heldout"]
        print(f"{m['source']:>10}: train {tr['documents']} docs {tr['tokens']} tokens, "
              f"heldout {ho['documents']} docs {ho['tokens']} tokens, "
              f"skipped {m['num_skipped']}, tokenizer {m['tokenizer']['identity']}")
        for skip in m["skipped"][:10]:
            print(f"{'':>12}skipped {skip['file']}: {skip['reason']}")


def run(args: argparse.Namespace) -> int:
    from moesaic.cli import refusals

    try:
        if args.data_command == "embedded":
            from moesaic.data.corpora import build_embedded

            _report(list(build_embedded(args.out, size=args.size).values()))
            return 0
        from moesaic.data.prepare import prepare

        _report(prepare(args.source, args.out, tokenizer=args.tokenizer, glob=args.glob,
                        text_field=args.text_field, heldout_fraction=args.heldout_fraction,
                        max_doc_bytes=args.max_doc_bytes, overwrite=args.overwrite))
        return 0
    except (ValueError, OSError) as e:  # FileNotFoundError and FileExistsError are OSErrors
        if refusals.disk_full(e):
            e = refusals.disk_full_message(e, f"--out {args.out}")
        elif not isinstance(e, (ValueError, FileNotFoundError, FileExistsError)):
            raise
        print(f"moesaic data: error: {e}", file=sys.stderr)
        return 2
