"""Command line: ``python -m captioning caption`` (the core) and the training lab's subcommands
(``captioning.lab.commands``: extract-features, train, evaluate, ...).

Errors reach the user as one line on stderr and a non-zero exit, never as a traceback.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .bundle import DEFAULT_MODEL, BundleError
from .decode_config import DecodeConfig

#: Subcommands of the inference core; every other one is the training lab's.
CORE_COMMANDS = frozenset({"caption"})


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    """An unexpected exception as one line: its type (the message alone can be just '0') and message."""
    text = " ".join(str(e).strip("'\"").split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def decode_args(a: argparse.Namespace, **extra) -> DecodeConfig:
    """The decoding flags (--beam, --nbest, --length-penalty, --rerank, --rerank-pool, --guide)
    as a DecodeConfig; flags a command does not have keep DecodeConfig's defaults."""
    given = {"beam_size": getattr(a, "beam", None), "nbest": getattr(a, "nbest", None),
             "length_penalty": getattr(a, "length_penalty", None), "rerank": getattr(a, "rerank", None),
             "rerank_pool": getattr(a, "rerank_pool", None), "guide": getattr(a, "guide", None), **extra}
    return DecodeConfig().replace(**{k: v for k, v in given.items() if v is not None})


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
PROGRESS_FROM = 20  # images; fewer finish before a progress bar would say anything


def expand_inputs(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Image files named directly, every image file under a folder (recursively, sorted), and the
    files a glob matches (``**`` included; for a quoted pattern the shell did not expand).
    Returns (paths, errors): a pattern that matches nothing is an error; a missing plain path is
    kept, so that it fails as that image's own error."""
    out: list[str] = []
    errors: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(f"{item}: no image files in this folder")
            out += found
        elif not p.exists() and glob.has_magic(item):
            found = sorted(f for f in glob.glob(item, recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(f"{item}: no image files match")
            out += found
        else:
            out.append(item)
    return list(dict.fromkeys(out)), errors


class ResultsFile:
    """``--out FILE``: results appended one image at a time (JSON Lines for .jsonl, CSV for .csv),
    so a killed run keeps what it finished, and a rerun skips the images already captioned there."""

    CSV_FIELDS = ["image", "rank", "caption", "logprob", "score", "finished", "error"]

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.kind = {".jsonl": "jsonl", ".csv": "csv"}.get(self.path.suffix.lower())
        if self.kind is None:
            raise ValueError(f"{self.path}: --out must end in .jsonl or .csv")

    def done(self) -> set[str]:
        """Images the file already holds a caption for (an image that failed is tried again)."""
        if not self.path.is_file():
            return set()
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            # A run killed mid-line: drop the half line so that appending starts on a fresh one.
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text, encoding="utf-8")
        if self.kind == "jsonl":
            rows = []
            for line in text.splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
            return {r["image"] for r in rows if isinstance(r, dict) and "image" in r and not r.get("error")}
        return {r["image"] for r in csv.DictReader(io.StringIO(text)) if r.get("image") and not r.get("error")}

    def append(self, result: dict) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8", newline="") as f:
            if self.kind == "jsonl":
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
            else:
                w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS)
                if new:
                    w.writeheader()
                if "error" in result:
                    w.writerow({"image": result["image"], "error": result["error"]})
                for rank, c in enumerate(result.get("captions", []), 1):
                    w.writerow({"image": result["image"], "rank": rank, "caption": c["text"], "logprob": c["logprob"],
                                "score": c["score"], "finished": c["finished"]})
            f.flush()


def cmd_caption(a: argparse.Namespace) -> int:
    from .api import Captioner
    from .images import ImageError
    from .samples import load_sample, sample_names

    paths, missing = expand_inputs(a.images)
    for m in missing:
        _err(m)
    inputs: list = list(paths)
    names = sample_names() if a.samples else (a.sample or [])
    for n in names:
        inputs.append(("sample:" + n, n))
    if not inputs:
        if missing:
            return 1
        _err("give IMAGE files, folders or globs, --sample NAME or --samples")
        return 2
    # Settings are checked once, before any image: a bad one is the command's error, not each image's.
    if a.beam < 1 or a.nbest < 1:
        _err(f"--beam and --nbest must be at least 1 (got {a.beam} and {a.nbest})")
        return 2
    if a.nbest > a.beam and a.beam > 1:
        _err(f"--nbest ({a.nbest}) cannot exceed --beam ({a.beam})")
        return 2
    if a.rerank_pool is not None and a.rerank_pool < 0:
        _err(f"rerank_pool must be >= 0, got {a.rerank_pool} (--rerank-pool)")
        return 2
    out = ResultsFile(a.out) if a.out else None
    skipped = 0
    if out is not None:
        done = out.done()
        todo = [i for i in inputs if (i[0] if isinstance(i, tuple) else i) not in done]
        skipped, inputs = len(inputs) - len(todo), todo
    cap = Captioner.from_pretrained(a.model)
    if a.rerank and cap.matcher is None:
        _err(f"{a.model or DEFAULT_MODEL}: --rerank needs a matcher in the model folder (python -m captioning train-matcher)")
        return 2
    # Guidance needs beam search: a beam of one is then searched, not decoded greedily.
    decode = decode_args(a, method="greedy" if a.beam == 1 and not a.guide else "beam")
    progress = None
    if len(inputs) >= PROGRESS_FROM and not a.quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(inputs), desc="captioning", unit="image", file=sys.stderr)
    results, failed = [], 0
    for item in inputs:
        path = item[0] if isinstance(item, tuple) else item
        # Each image is isolated at every stage (reading the sample, decoding, encoding,
        # decoding the caption): whatever one image raises costs that image its caption, not
        # the others theirs.
        try:
            src = load_sample(item[1]) if isinstance(item, tuple) else item
            r = cap.caption(src, decode)[0]
        except Exception as e:  # noqa: BLE001 (KeyboardInterrupt still stops the run)
            msg = str(e) if isinstance(e, ImageError) else _one_line(e)
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            _err(msg)
            failed += 1
            res = {"image": path, "error": msg}
        else:
            res = {"image": path, "captions": [
                {"text": c.text, "logprob": round(c.logprob, 4), "score": round(c.score, 4), "finished": c.finished}
                for c in r.captions],
                **({"familiarity": r.familiarity.to_dict()} if r.familiarity else {}),
                **({"recognised": [x.to_dict() for x in r.recognised[:3]]} if r.recognised else {}),
                **({"guided": r.guided} if r.guided is not None else {})}
            if not a.json and out is None:
                if a.nbest == 1:
                    print(f"{path}\t{r.text}")
                else:
                    print(path)
                    for c in r.captions:
                        print(f"  {c.logprob:8.3f}  {c.text}")
        results.append(res)
        if out is not None:
            out.append(res)
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    if a.json:
        print(json.dumps({"model": str(a.model or DEFAULT_MODEL), "results": results}, indent=2))
    if out is not None and not a.quiet:
        print(f"{out.path}: {len(results) - failed} captioned, {failed} failed"
              + (f", {skipped} already there" if skipped else ""), file=sys.stderr)
    return 1 if failed or missing else 0


def build_parser(lab: bool = True) -> argparse.ArgumentParser:
    """The parser; ``lab`` False leaves out the training lab's subcommands (nothing of it is imported)."""
    ap = argparse.ArgumentParser(prog="captioning", description="Neural image captioning (CNN encoder + LSTM decoder).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("caption", help="caption image files, folders (recursively) and globs")
    c.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders (every image in them, "
                                                           "recursively) or globs such as 'photos/**/*.jpg'")
    c.add_argument("--sample", action="append", help="caption a sample photo shipped with installed packages")
    c.add_argument("--samples", action="store_true", help="caption every sample photo")
    c.add_argument("--model", default=None, help=f"model folder (default: {DEFAULT_MODEL})")
    c.add_argument("--beam", type=int, default=3, help="beam size (1 = greedy)")
    c.add_argument("--nbest", type=int, default=1, help="how many captions per image")
    c.add_argument("--length-penalty", type=float, default=None, help="default: the model's (config.json decoding)")
    c.add_argument("--rerank", type=float, default=None,
                   help="matcher weight for re-ranking the beams (default: the model's; 0: off)")
    c.add_argument("--rerank-pool", type=int, default=None,
                   help="how many finished captions re-ranking considers (default: the model's; 0: the beam size)")
    c.add_argument("--guide", action=argparse.BooleanOptionalAction, default=None,
                   help="guided decoding: name what the encoder's ImageNet head confidently recognises "
                        "(default: the model's, config.json decoding.guide)")
    c.add_argument("--json", action="store_true", help="print one JSON document")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="write the results to FILE.jsonl (JSON Lines) or FILE.csv as they come; a rerun skips "
                        "the images FILE already has captions for")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary on stderr")
    c.set_defaults(fn=cmd_caption)

    if lab:
        from .lab.commands import add_commands

        add_commands(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `caption` needs no training code: its parser is built without the lab's subcommands.
    a = build_parser(lab=not argv or argv[0] not in CORE_COMMANDS).parse_args(argv)
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (BundleError, FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as e:
        msg = str(e).strip("'\"") or type(e).__name__
        _err(msg.splitlines()[0])
        return 2
    except Exception as e:  # noqa: BLE001 (the promise is one line, never a traceback)
        _err(_one_line(e))
        return 1
