"""The output folder of `data_prep/encode_latents.py`: whose it is and whether a run may write
into it, checked before any model is loaded.

- `check_output`: refuse a folder this tool did not write (the input shards' own folder, a
  manifest, tars or records without its job.json, a manifest of another job).
- `check_job`: compare the settings of this run with the folder's job.json; a job with other
  settings is refused once it recorded a shard or while another process writes shards (a
  `records/<shard>.lock` held: `running_writers`), and replaced when it recorded nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from lct.errors import UserError
from lct.latents import JOB, MANIFEST, RECORDS
from lct.shards import FileLock
from lct.text import TOWER_DIR


def check_output(out: Path, urls: list[str], names: list[str]) -> None:
    """Refuse an --output that holds what this tool did not write (before any work): the input
    shards themselves, or a manifest.json, tars or records without this tool's job.json."""
    if not out.is_dir():
        return
    here = out.resolve()
    for u, n in zip(urls, names):
        if "://" not in u and not u.startswith("pipe:") and Path(u).resolve() == here / f"{n}.tar":
            raise UserError(f"--output {out} is the folder of the input shards: writing {n}.tar would replace "
                            "the input; choose another --output")
    job = None
    if (out / JOB).is_file():
        try:
            job = json.loads((out / JOB).read_text())
        except ValueError:
            job = None
    theirs = ([MANIFEST] if (out / MANIFEST).exists() else []) + sorted(p.name for p in out.glob("*.tar"))
    theirs += [f"{RECORDS}/{p.name}" for p in sorted((out / RECORDS).glob("*.json"))][:1]
    if job is None and theirs:
        raise UserError(f"--output {out} holds {', '.join(theirs[:3])} but no {JOB} of data_prep/encode_latents.py: "
                        "not this tool's output, which would be replaced; choose another (or an empty) --output")
    if job is not None and (out / MANIFEST).is_file():
        try:
            m = json.loads((out / MANIFEST).read_text())
        except ValueError:
            m = None
        if not isinstance(m, dict) or m.get("options") != job.get("options") or m.get("created_by") != job.get(
                "created_by"):
            raise UserError(f"--output {out}: its {MANIFEST} was not written by the job recorded in {JOB}; move it "
                            "away (or choose another --output)")


def running_writers(out: Path) -> list[str]:
    """Descriptions of the processes holding a shard lock in `out` (other live jobs)."""
    held = []
    for p in sorted((out / RECORDS).glob("*.lock")):
        lock = FileLock(p)
        who = lock.probe()
        if who is not None:
            held.append(f"{p.stem} ({lock.describe(who)})")
    return held


def check_job(out: Path, header: dict | None, options: dict, log: Callable[[str], None] = print,
              replace: bool = True) -> dict | None:
    """Compare with the job.json of an earlier run; returns it (None when there is none). Call
    under the output's job lock. A job.json with other settings is refused once a shard has been
    recorded under it or while another process writes shards; an earlier job that recorded no
    shard (it failed) is replaced, with its temporary files and a random text tower of other settings."""
    path = out / JOB
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        old = {}
    cmp = [("options", options)] + ([("header", header)] if header is not None else [])
    for what, new in cmp:
        a = old.get("options") if what == "options" else {k: v for k, v in old.items() if k != "input"}
        b = new if what == "options" else {k: v for k, v in new.items() if k != "input"}
        if json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            diff = sorted(k for k in set(a or {}) | set(b) if (a or {}).get(k) != b.get(k))
            recorded = sorted(p.stem for p in (out / RECORDS).glob("*.json"))
            busy = running_writers(out)
            if recorded or busy or not replace:
                what_ = (f"{len(recorded)} shard(s) recorded" if recorded else
                     f"another job writing {busy[0]}" if busy else "no shard recorded yet")
                raise UserError(f"{out} holds latents encoded with other settings (differing: {', '.join(diff)}; "
                                f"{what_}); use another --output, or delete it to start over")
            log(f"{out}: replacing the settings of an earlier job that recorded no shard "
                f"(differing: {', '.join(diff)})")
            path.unlink()
            was = old.get("options") or {}
            if was.get("text_pretrained") == "random" and any(
                    was.get(k) != options.get(k) for k in ("text_model", "text_pretrained", "seed")):
                shutil.rmtree(out / TOWER_DIR, ignore_errors=True)  # its tower is not this job's
            for tmp in out.glob("*.tar.*tmp"):
                tmp.unlink(missing_ok=True)
            return None
    return old
