"""Convert OpenImages V6 box annotations to COCO-format JSON for `regionspot_pl.extract`.

    python scripts/openimages_to_coco.py \
        --boxes oidv6-train-annotations-bbox.csv \
        --classes class-descriptions-boxable.csv \
        --images /data/openimages/train --out openimages_v6_train_coco.json

OpenImages boxes are normalized (XMin, XMax, YMin, YMax in [0, 1]), so every image is opened
once (header only, via PIL) to read its size. IsGroupOf boxes become iscrowd=1, which the
extractor skips, as it skips COCO crowd boxes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

REQUIRED = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")


def convert(boxes_csv: Path, classes_csv: Path, image_dir: Path) -> dict:
    """OpenImages CSVs -> a COCO dict (categories in class-description order, ids from 1)."""
    with open(classes_csv, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][:2] == ["LabelName", "DisplayName"]:
        rows = rows[1:]
    categories = [{"id": i + 1, "name": name, "freebase_id": mid} for i, (mid, name) in enumerate(rows)]
    cat_of = {c["freebase_id"]: c["id"] for c in categories}

    per_image: dict[str, list] = defaultdict(list)
    with open(boxes_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{boxes_csv} lacks columns {missing}; expected an OpenImages V6 box CSV")
        for row in reader:
            if row["LabelName"] not in cat_of:
                raise ValueError(f"{boxes_csv}: label {row['LabelName']} is not in {classes_csv}")
            per_image[row["ImageID"]].append(row)

    images, annotations = [], []
    for image_id, (oi_id, rows) in enumerate(tqdm(sorted(per_image.items()), desc="images", unit="img"), start=1):
        file_name = f"{oi_id}.jpg"
        try:
            with Image.open(image_dir / file_name) as im:
                width, height = im.size
        except OSError as err:
            print(f"warning: skipping {file_name}: {err}", file=sys.stderr)
            continue
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "oi_id": oi_id})
        for row in rows:
            x0, x1 = float(row["XMin"]) * width, float(row["XMax"]) * width
            y0, y1 = float(row["YMin"]) * height, float(row["YMax"]) * height
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_of[row["LabelName"]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(row.get("IsGroupOf", "0") == "1"),
                }
            )
    return {"images": images, "annotations": annotations, "categories": categories}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", type=Path, required=True, help="oidv6-*-annotations-bbox.csv")
    p.add_argument("--classes", type=Path, required=True, help="class-descriptions-boxable.csv")
    p.add_argument("--images", type=Path, required=True, help="folder with {ImageID}.jpg")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for path in (args.boxes, args.classes, args.images):
        if not path.exists():
            print(f"error: not found: {path}", file=sys.stderr)
            return 2
    coco = convert(args.boxes, args.classes, args.images)
    args.out.write_text(json.dumps(coco))
    print(
        f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
        f"{len(coco['categories'])} classes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
