"""MS-COCO caption annotations, read one way for data prep (`data_prep/coco_to_wds.py`) and for
the evaluation protocol's caption draw (`lct.protocols`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lct.errors import UserError


def read_caption_annotations(path: str | os.PathLike, flag: str) -> list[dict]:
    """`captions_*2014.json` -> `[{image_id, file_name, width, height, captions}]` sorted by image
    id; captions in annotation-id order with whitespace collapsed, empty ones dropped. `flag` names
    the option the file came from, for the error message."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {int(im["id"]): {"image_id": int(im["id"]), "file_name": str(im["file_name"]),
                                  "width": int(im.get("width", 0)), "height": int(im.get("height", 0)),
                                  "captions": []} for im in data["images"]}
        anns = sorted(data["annotations"], key=lambda a: int(a["id"]))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{flag} {path}: not a COCO captions file ({err})") from None
    for a in anns:
        im = images.get(int(a["image_id"]))
        if im is not None:
            cap = " ".join(str(a.get("caption", "")).split())
            if cap:
                im["captions"].append(cap)
    return [images[i] for i in sorted(images)]
